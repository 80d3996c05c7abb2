"""Q4_K, Q5_K and Q6_K encoders, to write test GGUFs in the k-quant types (the `gguf` package
decodes these types but cannot encode them).

Simple, not llama.cpp's search for the best scales: per sub-block min/max (Q4_K, Q5_K) or
max-abs (Q6_K), 6- or 8-bit super-block scales. Valid blocks are all the tests need: they
compare the converter's decoding with llama.cpp's (gguf.quants.dequantize and the numpy
reference), not the quality of the quantization.

    blocks = quantize(weights_f32_2d, "Q4_K")   # uint8 [rows, row_bytes] for GGUFWriter.add_tensor
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float [...] -> little-endian half [..., 2] uint8."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [..., 8] -> the 12 bytes llama.cpp's get_scale_min_k4 reads."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    return out


def _affine(x: np.ndarray, levels: int):
    """Super-blocks [S, 8, 32] -> (d, dmin [S], sc, mn [S, 8] in 0..63, q [S, 8, 32])."""
    lo = np.minimum(x.min(-1), 0.0)                 # the min is subtracted: kept <= 0
    hi = x.max(-1)
    scale = (hi - lo) / (levels - 1)
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), 0, 63)
    mn = np.clip(np.round(-lo / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63)
    step = (d[:, None] * sc)[..., None]
    q = np.round((x + (dmin[:, None] * mn)[..., None]) / np.where(step > 0, step, 1))
    return d, dmin, sc, mn, np.clip(q, 0, levels - 1).astype(np.uint8)


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} values, not {cols}")
    ns = cols // QK_K
    if kind in ("Q4_K", "Q5_K"):
        x = w.reshape(rows * ns, 8, 32)
        d, dmin, sc, mn, q = _affine(x, 16 if kind == "Q4_K" else 32)
        # the 4 low bits: chunk c of 32 bytes holds sub-block 2c (low nibbles) and 2c+1 (high)
        low = q & 0xF
        qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, mn)]
        if kind == "Q5_K":
            # bit j of qh[l]: the fifth bit of element l of sub-block j
            high = (q >> 4) & 1                                                 # [S, 8, 32]
            qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
            parts.append(qh)
        parts.append(qs)
    elif kind == "Q6_K":
        x = w.reshape(rows * ns, 16, 16)
        scale = np.abs(x).max(-1) / 31                                          # q - 32 in -31..31
        d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)
        step = (d[:, None] * sc.astype(np.float32))[..., None]
        q = np.clip(np.round(x / np.where(step != 0, step, 1)) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(-1, 2, 4, 32)                     # [S, half, k, l]: element 128h + 32k + l
        ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                             q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], -1)  # [S, 2, 64]
        qh = sum(((q[:, :, k] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)  # [S, 2, 32]
        parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)]
    else:
        raise ValueError(kind)
    blocks = np.concatenate([p.reshape(rows * ns, -1) for p in parts], -1)
    assert blocks.shape[1] == BYTES[kind], (kind, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(rows, ns * BYTES[kind]))
