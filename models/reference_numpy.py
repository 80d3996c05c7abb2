#!/usr/bin/env python3
"""Independent reference forward pass: plain numpy (float64) over the GGUF weights as stored.

Written separately from llama_onnx.py / convert_gguf.py on purpose: it has its own block
decoding and uses llama.cpp's own rotary convention (adjacent pairs (2i, 2i+1) rotated, on the Q
and K weights exactly as llama.cpp's converter permuted them), so a wrong un-permutation in the
ONNX graph shows up as a numeric difference here. Qwen2 takes llama.cpp's NEOX rotary instead
(halves, on unpermuted weights), with its q/k/v biases; Llama 3's rope_freqs divide the
frequencies. Block types other than Q4_0/Q4_1/Q8_0 (the k-quants) are decoded by the gguf
package, llama.cpp's own Python.

    python models/reference_numpy.py --gguf X.gguf --ids 1 2 3
"""
from __future__ import annotations

import argparse

import numpy as np

BLOCK = 32


def _half(b: np.ndarray) -> np.ndarray:
    """Little-endian IEEE half in two uint8 columns -> float64."""
    u16 = b[..., 0].astype(np.uint16) | (b[..., 1].astype(np.uint16) << 8)
    return u16.view(np.float16).astype(np.float64)


def dequantize(type_name: str, raw: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """Blocks of one GGUF tensor -> float64 [n_rows, n_cols] (n_cols = contiguous dim)."""
    raw = np.asarray(raw)
    if type_name == "F32":
        return raw.astype(np.float64).reshape(n_rows, n_cols)
    if type_name == "F16":
        return raw.astype(np.float64).reshape(n_rows, n_cols)
    flat = raw.reshape(-1).view(np.uint8)
    n_blocks = n_rows * n_cols // BLOCK
    if type_name == "Q8_0":          # struct { f16 d; int8 qs[32]; }
        b = flat.reshape(n_blocks, 34)
        scale = _half(b[:, 0:2])
        vals = b[:, 2:].view(np.int8).astype(np.float64)
        return (vals * scale[:, None]).reshape(n_rows, n_cols)
    if type_name == "Q4_1":          # struct { f16 d; f16 m; uint8 qs[16]; }  x[j]=lo, x[j+16]=hi
        b = flat.reshape(n_blocks, 20)
        scale, minimum = _half(b[:, 0:2]), _half(b[:, 2:4])
        nib = np.empty((n_blocks, BLOCK), np.float64)
        nib[:, :16] = b[:, 4:] & 15
        nib[:, 16:] = b[:, 4:] >> 4
        return (nib * scale[:, None] + minimum[:, None]).reshape(n_rows, n_cols)
    if type_name == "Q4_0":          # struct { f16 d; uint8 qs[16]; }  (q - 8) * d
        b = flat.reshape(n_blocks, 18)
        scale = _half(b[:, 0:2])
        nib = np.empty((n_blocks, BLOCK), np.float64)
        nib[:, :16] = b[:, 2:] & 15
        nib[:, 16:] = b[:, 2:] >> 4
        return ((nib - 8.0) * scale[:, None]).reshape(n_rows, n_cols)
    # the rest (k-quants among them) as the gguf package, llama.cpp's own Python, decodes them
    import gguf
    vals = gguf.quants.dequantize(flat, gguf.GGMLQuantizationType[type_name])
    return np.asarray(vals, np.float64).reshape(n_rows, n_cols)


class GGUFLlama:
    def __init__(self, path):
        import gguf
        r = gguf.GGUFReader(str(path))

        def kv(key, default=None):
            f = r.fields.get(key)
            return default if f is None else f.contents()

        a = kv("general.architecture")
        # llama.cpp's rotary kinds: NORM (adjacent pairs, on its permuted Q/K) for llama,
        # NEOX (halves) for qwen2
        self.neox = a == "qwen2"
        self.n_layer = int(kv(f"{a}.block_count"))
        self.n_embd = int(kv(f"{a}.embedding_length"))
        self.n_head = int(kv(f"{a}.attention.head_count"))
        self.n_head_kv = int(kv(f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.eps = float(kv(f"{a}.attention.layer_norm_rms_epsilon"))
        self.freq_base = float(kv(f"{a}.rope.freq_base", 10000.0))
        self.t = {}
        for t in r.tensors:
            ne = [int(x) for x in t.shape]            # ne[0] is the contiguous dimension
            rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
            self.t[t.name] = dequantize(t.tensor_type.name, t.data, rows, ne[0])
        self.out_w = self.t.get("output.weight", self.t["token_embd.weight"])
        hd = self.head_dim
        self.freqs = self.freq_base ** (-np.arange(0, hd, 2) / hd)
        if "rope_freqs.weight" in self.t:          # Llama 3: divided by its factors
            self.freqs = self.freqs / self.t["rope_freqs.weight"].reshape(-1)
        if kv(f"{a}.rope.scaling.type") == "linear":
            self.freqs = self.freqs / float(kv(f"{a}.rope.scaling.factor"))

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w.reshape(-1)

    def _rope(self, x, pos):
        """x [n, heads, hd]; llama.cpp LLAMA_ROPE_TYPE_NORM rotates (x[2i], x[2i+1]),
        LLAMA_ROPE_TYPE_NEOX (x[i], x[i + hd/2])."""
        hd = x.shape[-1]
        theta = pos[:, None].astype(np.float64) * self.freqs[None, :]
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        first, second = (slice(0, hd // 2), slice(hd // 2, hd)) if self.neox else \
            (slice(0, None, 2), slice(1, None, 2))
        x0, x1 = x[..., first], x[..., second]
        out = np.empty_like(x)
        out[..., first] = x0 * c - x1 * s
        out[..., second] = x0 * s + x1 * c
        return out

    def forward(self, ids):
        """Logits [n, vocab] (float64) for token ids, all positions, no cache."""
        ids = np.asarray(ids, np.int64)
        n, hd = len(ids), self.head_dim
        pos = np.arange(n)
        x = self.t["token_embd.weight"][ids]
        causal = np.tril(np.ones((n, n), bool))
        grp = self.n_head // self.n_head_kv
        for L in range(self.n_layer):
            T = lambda name: self.t[f"blk.{L}.{name}.weight"]  # noqa: E731
            bias = lambda name: self.t.get(f"blk.{L}.{name}.bias", 0.0)  # noqa: E731
            h = self._norm(x, T("attn_norm"))
            q = (h @ T("attn_q").T + bias("attn_q")).reshape(n, self.n_head, hd)
            k = (h @ T("attn_k").T + bias("attn_k")).reshape(n, self.n_head_kv, hd)
            v = (h @ T("attn_v").T + bias("attn_v")).reshape(n, self.n_head_kv, hd)
            q, k = self._rope(q, pos), self._rope(k, pos)
            att = np.empty((n, self.n_head, hd))
            for hh in range(self.n_head):
                kvh = hh // grp
                sc = q[:, hh, :] @ k[:, kvh, :].T / np.sqrt(hd)
                sc = np.where(causal, sc, -np.inf)
                sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
                sc /= sc.sum(axis=-1, keepdims=True)
                att[:, hh, :] = sc @ v[:, kvh, :]
            x = x + att.reshape(n, -1) @ T("attn_output").T
            h = self._norm(x, T("ffn_norm"))
            gate, up = h @ T("ffn_gate").T, h @ T("ffn_up").T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ T("ffn_down").T
        x = self._norm(x, self.t["output_norm.weight"])
        return x @ self.out_w.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", type=int, nargs="+", required=True)
    a = ap.parse_args()
    logits = GGUFLlama(a.gguf).forward(a.ids)
    print("argmax per position:", logits.argmax(-1).tolist())


if __name__ == "__main__":
    main()
