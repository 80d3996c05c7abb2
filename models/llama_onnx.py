"""Build Llama-family decoder graphs with a KV cache as ONNX, for ONNX Runtime and tract.

The weights come in as the containers below (rows = output features, blocks of 32 along the
input dimension, the way GGUF stores them) already in Hugging Face row order (rotate-half
rotary). Three I/O layouts:

* ``optimum``: inputs input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64,
  position_ids [batch, seq] int64, past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
  f32; outputs logits [batch, seq, vocab] f32, present.{i}.key|value [batch, kv_heads, past+seq,
  head_dim] f32.
* ``merged``: as optimum plus a bool input use_cache_branch [1] and an If over two branches
  (Optimum's merged decoder). Both branches concatenate the past, which is empty by contract
  when the flag is false, so their output shapes agree (tract requires that).
* ``genai``: as optimum without position_ids; positions come from cumsum(attention_mask) - 1.

Weight forms (see README.md for the measurements behind the defaults):

* Q4_1 linear ``nbits``: ``x @ W.T = x @ (d*(q-8)).T + blocksum(x) @ (m+8d).T``: a
  com.microsoft MatMulNBits (bits 4, block 32, default zero point 8) plus a small MatMul over
  per-block sums of x. No loss against the GGUF weights. ``f32``: dequantized MatMul.
* Q8_0 output layer/embedding (tied): ``split4``: q = 16*h + l with h in [-8, 7], l in [0, 15];
  two 4-bit MatMulNBits, one on h+8 with scale 16d and zero point 8, one on l with scale d and
  zero point 0, added. Lossless, runs on both engines (tract has 4-bit MatMulNBits only; it
  panics on a single MatMulNBits over [x, x] with both planes, so they stay separate). ``nbits8``: 8-bit MatMulNBits (ORT only).
  ``f32``: dequantized MatMul. The embedding gathers rows of the same packed bytes and unpacks
  them in the graph (Gather + arithmetic), so the tied matrix is stored once.

Attention forms: ``plain`` (standard ops, both engines) and ``gqa`` (ONNX Runtime only, optimum
layout, same I/O): per layer one com.microsoft GroupQueryAttention on the packed q/k/v
projection, with rotary inside (rotate-half, cos/sin tables up to max_position_embeddings) and
the present K/V written by the kernel, and RMSNorm as (Skip)SimplifiedLayerNormalization.
Same weights; ONNX Runtime's optimized decode graph has 819 nodes instead of 1528.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QK = 32  # block size of Q4_1 and Q8_0
MAIN_OPSET = 17
FLOAT_MIN = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------- weights
@dataclasses.dataclass
class F32W:
    a: np.ndarray  # [N, K] float32

    @property
    def shape(self):
        return self.a.shape

    def dequant(self) -> np.ndarray:
        return self.a.astype(np.float32)

    def take_rows(self, idx):
        return F32W(self.a[idx])


@dataclasses.dataclass
class Q41W:
    """Q4_1 blocks: w = d*q + m, q in [0, 15]."""
    d: np.ndarray  # [N, nb] float32 (from f16)
    m: np.ndarray  # [N, nb] float32 (from f16)
    q: np.ndarray  # [N, nb, 32] uint8

    @property
    def shape(self):
        return (self.q.shape[0], self.q.shape[1] * QK)

    def dequant(self) -> np.ndarray:
        w = self.d[:, :, None] * self.q.astype(np.float32) + self.m[:, :, None]
        return w.reshape(self.shape).astype(np.float32)

    def take_rows(self, idx):
        return Q41W(self.d[idx], self.m[idx], self.q[idx])


@dataclasses.dataclass
class Q80W:
    """Q8_0 blocks: w = d*q, q in [-128, 127]."""
    d: np.ndarray  # [N, nb] float32 (from f16)
    q: np.ndarray  # [N, nb, 32] int8

    @property
    def shape(self):
        return (self.q.shape[0], self.q.shape[1] * QK)

    def dequant(self) -> np.ndarray:
        return (self.d[:, :, None] * self.q.astype(np.float32)).reshape(self.shape).astype(np.float32)

    def take_rows(self, idx):
        return Q80W(self.d[idx], self.q[idx])


@dataclasses.dataclass
class QKW:
    """Blocks of `q.shape[2]` integers q in [0, 2**bits): w = s*(q - z) + r, one zero point z
    for all blocks, r per block (None when 0). The 5- and 6-bit types as llama.cpp decodes them,
    exactly: Q5_K (blocks of 32, z 0, r = -dmin*m), Q6_K (blocks of 16, z 32, no r), Q5_0 (z 16),
    Q5_1 (z 0, r = m); Q4_K is a Q41W."""
    s: np.ndarray        # [N, nb] float32
    z: int
    r: "np.ndarray | None"  # [N, nb] float32
    q: np.ndarray        # [N, nb, bs] uint8
    bits: int

    @property
    def shape(self):
        return (self.q.shape[0], self.q.shape[1] * self.q.shape[2])

    @property
    def block(self):
        return self.q.shape[2]

    def dequant(self) -> np.ndarray:
        w = self.s[:, :, None] * (self.q.astype(np.float32) - np.float32(self.z))
        if self.r is not None:
            w = w + self.r[:, :, None]
        return w.reshape(self.shape).astype(np.float32)

    def take_rows(self, idx):
        return QKW(self.s[idx], self.z, None if self.r is None else self.r[idx], self.q[idx], self.bits)


def same_form(ws) -> bool:
    """Whether weights can be stacked into one (fused) weight without changing their form."""
    k = type(ws[0])
    if not all(type(w) is k for w in ws):
        return False
    if k is QKW:
        return len({(w.z, w.bits, w.block, w.r is None) for w in ws}) == 1
    return True


def concat_rows(ws):
    """Stack weights of the same form along N (for fused QKV / gate-up projections; parts of
    different forms stay apart, see Stacked)."""
    if not same_form(ws):
        raise ValueError("concat_rows takes weights of one form")
    k = type(ws[0])
    if k is F32W:
        return F32W(np.concatenate([w.a for w in ws], 0))
    if k is Q41W:
        return Q41W(*(np.concatenate([getattr(w, f) for w in ws], 0) for f in ("d", "m", "q")))
    if k is QKW:
        r = None if ws[0].r is None else np.concatenate([w.r for w in ws], 0)
        return QKW(np.concatenate([w.s for w in ws], 0), ws[0].z, r,
                   np.concatenate([w.q for w in ws], 0), ws[0].bits)
    return Q80W(*(np.concatenate([getattr(w, f) for w in ws], 0) for f in ("d", "q")))


def pack_nibbles(v: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes, element 2i in the low nibble (MatMulNBits)."""
    v = v.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


@dataclasses.dataclass
class LlamaConfig:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    # Llama 3's rope_freqs (or linear rope scaling): each rotary frequency is divided by its factor
    rope_factors: "np.ndarray | None" = None


def inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The rotary frequencies [head_dim / 2] (f32), with the model's rope factors applied."""
    hd = cfg.head_dim
    f = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
         ).astype(np.float32)
    if cfg.rope_factors is not None:
        f = (f / np.asarray(cfg.rope_factors, np.float32)).astype(np.float32)
    return f


@dataclasses.dataclass
class BuildOptions:
    layout: str = "optimum"        # optimum | merged | genai
    linear: str = "nbits"          # for Q4_1 weights: nbits | f32
    q8: str = "split4"             # for Q8_0 weights: split4 | nbits8 | f32
    kq: str = "nbits8"             # for QKW (5/6-bit) weights: nbits8 (ORT) | split4 (both engines) | f32
    # round the scales of 4-bit blocks of 32 to f16: tract packs such blocks with f16 scales, so
    # its file then says what it computes (the k-quants' d*sc scales are not all f16 numbers)
    f16_scales: bool = False
    accuracy_level: int = 4        # MatMulNBits accuracy_level (ORT; tract ignores it)
    fuse: bool = True              # fuse q/k/v and gate/up projections
    blocksum: str = "reduce"       # Q4_1 correction's block sums: reduce (Reshape+ReduceSum) | matmul
    accuracy_overrides: dict = dataclasses.field(default_factory=dict)  # name substring -> level
    attention: str = "plain"       # plain (both engines) | gqa (ONNX Runtime contrib ops, optimum layout)
    last_logits: bool = False      # logits [B, 1, V] of the last position (what emberd reads; not Optimum's I/O)
    doc: str = ""

    def acc_for(self, name: str) -> int:
        for sub, lvl in self.accuracy_overrides.items():
            if sub in name:
                return lvl
        return self.accuracy_level


# ----------------------------------------------------------------------------- graph helper
class G:
    def __init__(self, prefix=""):
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self._n = 0
        self.prefix = prefix
        self._consts: Dict[tuple, str] = {}

    def name(self, base):
        self._n += 1
        return f"{self.prefix}{base}_{self._n}"

    def op(self, op_type, inputs, n_out=1, name=None, domain=None, out=None, **attrs):
        # a node writing a named tensor (graph outputs) takes that name: tract reports outputs by
        # node name, so `present.3.key` is found under its ONNX name there too
        nm = name or (out if isinstance(out, str) else None) or self.name(op_type)
        outs = out if out is not None else [f"{nm}_out{i}" for i in range(n_out)]
        if isinstance(outs, str):
            outs = [outs]
        kw = dict(attrs)
        if domain:
            kw["domain"] = domain
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=nm, **kw))
        return outs[0] if len(outs) == 1 else outs

    def init(self, name, arr):
        arr = np.asarray(arr)
        self.inits.append(numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(), name))
        return name

    def alias(self, name, suffix):
        """A second initializer name for the same data: ONNX Runtime frees a prepacked weight's
        raw tensor only when no other node reads it under that name."""
        new = name + suffix
        if not any(t.name == new for t in self.inits):
            t = onnx.TensorProto()
            t.CopyFrom(next(t for t in self.inits if t.name == name))
            t.name = new
            self.inits.append(t)
        return new

    def const(self, value, dtype=np.int64):
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("const"), arr)
        return self._consts[key]


# ----------------------------------------------------------------------------- linear layers
def kept_quantized(w, opts: BuildOptions) -> bool:
    """Whether `opts` keep this weight in a quantized form (else it is stored as f32)."""
    return ((isinstance(w, Q41W) and opts.linear == "nbits")
            or (isinstance(w, Q80W) and opts.q8 != "f32")
            or (isinstance(w, QKW) and opts.kq != "f32"))


class Stacked:
    """Linears whose outputs are concatenated: a fused projection whose parts keep their forms."""

    def __init__(self, parts):
        self.parts = parts

    @property
    def g(self):
        return self.parts[0].g

    @g.setter
    def g(self, g):  # the merged layout rebinds every Linear to each branch's subgraph
        for part in self.parts:
            part.g = g

    def __call__(self, x):
        return self.g.op("Concat", [part(x) for part in self.parts], axis=-1)


def pack_zero_points(z: np.ndarray) -> np.ndarray:
    """[N, nb] 4-bit zero points -> [N, ceil(nb / 2)] bytes, block 2i in the low nibble."""
    z = z.astype(np.uint8)
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], 1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


class Linear:
    """Emits the nodes for y = x @ W.T (+ bias) for one weight (possibly fused) in the chosen form."""

    def __init__(self, g: G, w, name: str, opts: BuildOptions, bias=None):
        self.g, self.w, self.name, self.opts = g, w, name, opts
        N, K = w.shape
        self.N, self.K = N, K
        self.has_corr, self.block = False, QK
        self.bias = None
        if bias is not None:
            self.bias = g.init(f"{name}.bias", np.asarray(bias, np.float32))
        if isinstance(w, Q41W) and opts.linear == "nbits":
            self.kind = "q4"
            d = self._scales(w.d)
            g.init(f"{name}.qweight", pack_nibbles(w.q))                       # [N, nb, 16]
            g.init(f"{name}.scales", d)                                        # [N, nb]
            self._corr((w.m + 8.0 * d).T)   # Q4_0 (m = -8d) needs no correction
        elif isinstance(w, QKW) and opts.kq in ("nbits8", "split4"):
            self.block = w.block
            nb = w.s.shape[1]
            if opts.kq == "nbits8":
                # one 8-bit MatMulNBits with the block's zero point: exact for q < 256
                self.kind = "kq8"
                g.init(f"{name}.qweight", np.ascontiguousarray(w.q, np.uint8))  # [N, nb, bs]
                g.init(f"{name}.scales", w.s.astype(np.float32))
                g.init(f"{name}.zero_points", np.full((N, nb), w.z, np.uint8))
            else:
                # q = 16*h + l: two 4-bit MatMulNBits (tract has 4-bit only), z split the same way
                if w.z % 16:
                    raise ValueError(f"{name}: zero point {w.z} does not split into 4-bit planes")
                self.kind = "kqsplit4"
                sc = self._scales(w.s)
                g.init(f"{name}.qweight_hi", pack_nibbles(w.q >> 4))
                g.init(f"{name}.scales_hi", (16.0 * sc).astype(np.float32))
                g.init(f"{name}.zero_points_hi", pack_zero_points(np.full((N, nb), w.z >> 4)))
                g.init(f"{name}.qweight_lo", pack_nibbles(w.q & 15))
                g.init(f"{name}.scales_lo", sc)
                g.init(f"{name}.zero_points_lo", pack_zero_points(np.zeros((N, nb))))
            if w.r is not None:
                self._corr(w.r.T)
        elif isinstance(w, Q80W) and opts.q8 == "split4":
            self.kind = "q8split4"
            q = w.q.astype(np.int16)
            h = np.floor_divide(q, 16)          # [-8, 7]
            l = q - 16 * h                      # [0, 15]
            nb = w.d.shape[1]
            # two MatMulNBits: h+8 (scale 16d, default zero point 8) and l (scale d, zero point 0)
            g.init(f"{name}.qweight_hi", pack_nibbles(h + 8))
            g.init(f"{name}.scales_hi", (16.0 * w.d).astype(np.float32))
            g.init(f"{name}.qweight_lo", pack_nibbles(l))
            g.init(f"{name}.scales_lo", w.d.astype(np.float32))
            g.init(f"{name}.zero_points_lo", np.zeros((N, (nb + 1) // 2), np.uint8))
        elif isinstance(w, Q80W) and opts.q8 == "nbits8":
            self.kind = "q8nbits8"
            g.init(f"{name}.qweight", (w.q.astype(np.int16) + 128).astype(np.uint8))  # [N, nb, 32]
            g.init(f"{name}.scales", w.d.astype(np.float32))
        else:
            self.kind = "f32"
            g.init(f"{name}.weight_t", w.dequant().T.copy())                    # [K, N]

    def _scales(self, scales):
        scales = np.asarray(scales, np.float32)
        if self.opts.f16_scales and self.block == 32:
            return scales.astype(np.float16).astype(np.float32)
        return scales

    def _corr(self, corr):
        """Per-block additive terms [nb, N], applied as blocksum(x) @ corr (skipped when all 0)."""
        corr = np.asarray(corr, np.float32)
        self.has_corr = bool(np.any(corr != 0))
        if self.has_corr:
            self.g.init(f"{self.name}.blockcorr", corr.copy())

    def _nbits(self, x, suffix, bits, zero_points=False):
        n = self.name
        inputs = [x, f"{n}.qweight{suffix}", f"{n}.scales{suffix}"]
        if zero_points:
            inputs.append(f"{n}.zero_points{suffix}")
        return self.g.op("MatMulNBits", inputs, domain="com.microsoft", K=self.K, N=self.N, bits=bits,
                         block_size=self.block, accuracy_level=self.opts.acc_for(n))

    def __call__(self, x):
        y = self._matmul(x)
        return y if self.bias is None else self.g.op("Add", [y, self.bias])

    def _matmul(self, x):
        g, o = self.g, self.opts
        if self.kind == "f32":
            return g.op("MatMul", [x, f"{self.name}.weight_t"])
        if self.kind == "q4":
            y = self._nbits(x, "", 4)
        elif self.kind == "kq8":
            y = self._nbits(x, "", 8, zero_points=True)
        elif self.kind == "kqsplit4":
            y = g.op("Add", [self._nbits(x, "_hi", 4, True), self._nbits(x, "_lo", 4, True)])
        elif self.kind == "q8split4":
            return g.op("Add", [self._nbits(x, "_hi", 4), self._nbits(x, "_lo", 4, True)])
        elif self.kind == "q8nbits8":
            return self._nbits(x, "", 8)
        else:
            raise AssertionError(self.kind)
        if not self.has_corr:
            return y
        bs = self.block
        nb = self.K // bs
        if o.blocksum == "matmul":   # per-block sums as x @ 0/1 indicator [K, nb]
            ind = np.repeat(np.eye(nb, dtype=np.float32), bs, axis=0)
            sums = g.op("MatMul", [x, g.const(ind, np.float32)])
        else:
            xb = g.op("Reshape", [x, g.const([0, 0, nb, bs])])
            sums = g.op("ReduceSum", [xb, g.const([-1])], keepdims=0)
        return g.op("Add", [y, g.op("MatMul", [sums, f"{self.name}.blockcorr"])])

    def gather_rows(self, ids, alias=""):
        """Embedding lookup on the stored form: rows `ids` of W (dequantized, f32). With `alias`,
        the gathers read the tables under names of their own (see G.alias)."""
        g, nm = self.g, self.name

        def t(name):
            return g.alias(name, alias) if alias else name

        def rows(table):
            return g.op("Gather", [t(table), ids], axis=0)

        def per_block(table):                                                  # [B,S,nb,1]
            return g.op("Unsqueeze", [rows(table), g.const([-1])])

        def unpack(packed, block):
            """Gathered nibble bytes [B,S,nb,block/2] -> values [B,S,nb,block], f32."""
            b = g.op("Cast", [g.op("Gather", [t(packed), ids], axis=0)], to=TensorProto.FLOAT)
            hi = g.op("Floor", [g.op("Mul", [b, g.const(1.0 / 16.0, np.float32)])])
            lo_ = g.op("Sub", [b, g.op("Mul", [hi, g.const(16.0, np.float32)])])
            pair = g.op("Concat", [g.op("Unsqueeze", [lo_, g.const([-1])]),
                                   g.op("Unsqueeze", [hi, g.const([-1])])], axis=-1)
            return g.op("Reshape", [pair, g.const([0, 0, -1, block])])

        def plus_corr(v):
            if not self.has_corr:
                return v
            # blockcorr is [nb, N]: gather its columns, then blocks last
            c = g.op("Transpose", [g.op("Gather", [t(f"{nm}.blockcorr"), ids], axis=1)], perm=[1, 2, 0])
            return g.op("Add", [v, g.op("Unsqueeze", [c, g.const([-1])])])

        def flat(v):
            return g.op("Reshape", [v, g.const([0, 0, self.K])])

        if self.kind == "f32":
            # weight_t is [K, N]; a separate row-major copy would double the size, so only
            # untied f32 embeddings use this path with their own table (see build()).
            raise AssertionError("gather_rows on f32 weight")
        if self.kind == "q4":
            v = g.op("Sub", [unpack(f"{nm}.qweight", QK), g.const(8.0, np.float32)])
            return flat(plus_corr(g.op("Mul", [v, per_block(f"{nm}.scales")])))
        if self.kind == "kq8":
            q = g.op("Cast", [rows(f"{nm}.qweight")], to=TensorProto.FLOAT)      # [B,S,nb,bs]
            z = g.op("Cast", [per_block(f"{nm}.zero_points")], to=TensorProto.FLOAT)
            return flat(plus_corr(g.op("Mul", [g.op("Sub", [q, z]), per_block(f"{nm}.scales")])))
        if self.kind == "kqsplit4":
            bs = self.block
            hi = g.op("Mul", [unpack(f"{nm}.qweight_hi", bs), g.const(16.0, np.float32)])
            q = g.op("Sub", [g.op("Add", [hi, unpack(f"{nm}.qweight_lo", bs)]),
                             g.const(float(self.w.z), np.float32)])
            return flat(plus_corr(g.op("Mul", [q, per_block(f"{nm}.scales_lo")])))
        if self.kind == "q8nbits8":
            qf = g.op("Sub", [g.op("Cast", [rows(f"{nm}.qweight")], to=TensorProto.FLOAT),
                              g.const(128.0, np.float32)])
            return flat(g.op("Mul", [qf, per_block(f"{nm}.scales")]))
        if self.kind == "q8split4":
            hi = unpack(f"{nm}.qweight_hi", QK)
            lo_ = unpack(f"{nm}.qweight_lo", QK)
            hi = g.op("Mul", [g.op("Sub", [hi, g.const(8.0, np.float32)]), per_block(f"{nm}.scales_hi")])
            lo_ = g.op("Mul", [lo_, per_block(f"{nm}.scales_lo")])
            return flat(g.op("Add", [hi, lo_]))
        raise AssertionError(f"gather_rows on {self.kind}")


# ----------------------------------------------------------------------------- the decoder
def _exact_q_scale(hd):
    """1/sqrt(head_dim) when it is a power of two (then folded into the Q weights, exactly)."""
    s = 1.0 / np.sqrt(hd)
    return s if float(np.exp2(np.round(np.log2(s)))) == s else None


def scale_rows(w, s):
    """w * s for a power-of-two s: exact on every form (scales, mins, f32 values, biases)."""
    s = np.float32(s)
    if isinstance(w, np.ndarray):
        return (w * s).astype(np.float32)
    if isinstance(w, F32W):
        return F32W((w.a * s).astype(np.float32))
    if isinstance(w, Q41W):
        return Q41W(w.d * s, w.m * s, w.q)
    if isinstance(w, QKW):
        return QKW(w.s * s, w.z, None if w.r is None else w.r * s, w.q, w.bits)
    return Q80W(w.d * s, w.q)


def _rms_norm(g: G, x, weight_name, eps):
    # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern ONNX Runtime fuses into (Skip)SimplifiedLayerNorm
    ms = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0, np.float32)])], axes=[-1], keepdims=1)
    r = g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])
    return g.op("Mul", [g.op("Div", [x, r]), weight_name])


def _rotate(g: G, x, cos, sin, half):
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
    x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])])
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def _decoder_body(g: G, cfg: LlamaConfig, opts: BuildOptions, lin: dict, embed_fn, names: dict,
                  use_past: bool):
    """Emit the decoder nodes. `names` maps logical I/O to tensor names in this (sub)graph."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    grp = nh // nkv
    ids, am = names["input_ids"], names["attention_mask"]

    # lengths: T = attention_mask length (past + seq), S = seq, past = T - S
    T = g.op("Gather", [g.op("Shape", [am]), g.const(1)], axis=0)
    S = g.op("Gather", [g.op("Shape", [ids]), g.const(1)], axis=0)
    P = g.op("Sub", [T, S])

    # positions
    if names.get("position_ids"):
        pos = names["position_ids"]
    else:  # genai: cumsum(mask) - 1 over the last S columns; padded slots -> 1 (as HF does)
        cs = g.op("Sub", [g.op("CumSum", [am, g.const(1)]), g.const(1)])
        last = g.op("Slice", [cs, g.op("Unsqueeze", [P, g.const([0])]),
                              g.op("Unsqueeze", [T, g.const([0])]), g.const([1])])
        am_last = g.op("Slice", [am, g.op("Unsqueeze", [P, g.const([0])]),
                                 g.op("Unsqueeze", [T, g.const([0])]), g.const([1])])
        pos = g.op("Where", [g.op("Equal", [am_last, g.const(0)]), g.const(1), last])

    # rotary tables [B, S, 1, hd]
    fr = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], to=TensorProto.FLOAT), g.const([-1])]),
                      g.const(inv_freq(cfg), np.float32)])
    emb = g.op("Concat", [fr, fr], axis=-1)
    cos = g.op("Unsqueeze", [g.op("Cos", [emb]), g.const([2])])
    sin = g.op("Unsqueeze", [g.op("Sin", [emb]), g.const([2])])
    if opts.fuse:
        heads = np.array([1.0] * (nh + nkv) + [0.0] * nkv, np.float32).reshape(-1, 1)
        sign = np.array([-1.0] * (hd // 2) + [1.0] * (hd // 2), np.float32)
        cos_all = g.op("Add", [g.op("Mul", [cos, g.const(heads, np.float32)]),
                               g.const(1.0 - heads, np.float32)])                  # [B,S,H',hd]
        sin_all = g.op("Mul", [sin, g.const(heads * sign[None, :], np.float32)])   # signed, 0 for v

    # mask [B, 1, S, T]: key j visible to query i iff j <= P + i and attention_mask[b, j] != 0
    qpos = g.op("Range", [P, T, g.const(1)])
    kpos = g.op("Range", [g.const(0), T, g.const(1)])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kpos, g.const([0])]),
                                  g.op("Unsqueeze", [qpos, g.const([1])])])      # [S, T]
    pad = g.op("Unsqueeze", [g.op("Cast", [am], to=TensorProto.BOOL), g.const([1, 2])])
    mask = g.op("And", [pad, g.op("Unsqueeze", [causal, g.const([0, 1])])])  # [B,1,S,T]
    # scores hold the grp query heads of a KV head as grp*S rows (row g*S + s), so the mask
    # repeats per group; built once for all layers
    mask = g.op("Tile", [mask, g.const([1, 1, grp, 1])])                        # [B,1,grp*S,T]

    x = embed_fn(g, ids)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(g, x, f"{p}.input_layernorm.weight", cfg.rms_norm_eps)
        if opts.fuse:
            # one rotary over all q/k/v heads of the fused projection (v heads: cos 1, sin 0)
            qkv = g.op("Reshape", [lin[f"{p}.qkv"](h), g.const([0, 0, nh + 2 * nkv, hd])])
            x1, x2 = g.op("Split", [qkv, g.const([hd // 2, hd // 2])], n_out=2, axis=-1)
            rot = g.op("Concat", [x2, x1], axis=-1)
            qkv = g.op("Add", [g.op("Mul", [qkv, cos_all]), g.op("Mul", [rot, sin_all])])
            q, k, v = g.op("Split", [qkv, g.const([nh, nkv, nkv])], n_out=3, axis=2)
        else:
            q, k, v = lin[f"{p}.q"](h), lin[f"{p}.k"](h), lin[f"{p}.v"](h)
            q = g.op("Reshape", [q, g.const([0, 0, nh, hd])])
            k = g.op("Reshape", [k, g.const([0, 0, nkv, hd])])
            v = g.op("Reshape", [v, g.const([0, 0, nkv, hd])])
            q = _rotate(g, q, cos, sin, hd // 2)
            k = _rotate(g, k, cos, sin, hd // 2)
        k = g.op("Transpose", [k], perm=[0, 2, 1, 3])          # [B, nkv, S, hd]
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        if use_past:
            k = g.op("Concat", [names[f"past_key.{i}"], k], axis=2, out=names[f"present_key.{i}"])
            v = g.op("Concat", [names[f"past_value.{i}"], v], axis=2, out=names[f"present_value.{i}"])
        else:
            k = g.op("Identity", [k], out=names[f"present_key.{i}"])
            v = g.op("Identity", [v], out=names[f"present_value.{i}"])
        # grouped-query attention without copying K/V. Each KV head is one product K @ Q^T
        # over the grp*S query rows of its group, keys on the long (row) side: a decode step
        # then fills tract's tall matrix tiles instead of one row in 64, and K is packed once
        # per KV head, not once per query head (tract decode at position 500: 24 -> 40 tok/s)
        q5 = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nkv, grp, hd])])],
                  perm=[0, 2, 3, 1, 4])                                              # [B,nkv,grp,S,hd]
        q4 = g.op("Reshape", [q5, g.const([0, 0, -1, hd])])                          # [B,nkv,grp*S,hd]
        if not _exact_q_scale(hd):
            q4 = g.op("Mul", [q4, g.const(1.0 / np.sqrt(hd), np.float32)])
        qt = g.op("Transpose", [q4], perm=[0, 1, 3, 2])                              # [B,nkv,hd,grp*S]
        sc = g.op("Transpose", [g.op("MatMul", [k, qt])], perm=[0, 1, 3, 2])         # [B,nkv,grp*S,T]
        sc = g.op("Where", [mask, sc, g.const(FLOAT_MIN, np.float32)])
        pr = g.op("Softmax", [sc], axis=-1)
        at = g.op("MatMul", [pr, v])                                                 # [B,nkv,grp*S,hd]
        at = g.op("Reshape", [at, g.const([0, 0, grp, -1, hd])])                     # [B,nkv,grp,S,hd]
        at = g.op("Reshape", [g.op("Transpose", [at], perm=[0, 3, 1, 2, 4]), g.const([0, 0, nh * hd])])
        x = g.op("Add", [x, lin[f"{p}.o"](at)])

        h = _rms_norm(g, x, f"{p}.post_attention_layernorm.weight", cfg.rms_norm_eps)
        if opts.fuse:
            gu = lin[f"{p}.gate_up"](h)
            gt, up = g.op("Split", [gu, g.const([cfg.intermediate_size] * 2)], n_out=2, axis=-1)
        else:
            gt, up = lin[f"{p}.gate"](h), lin[f"{p}.up"](h)
        act = g.op("Mul", [g.op("Mul", [gt, g.op("Sigmoid", [gt])]), up])
        x = g.op("Add", [x, lin[f"{p}.down"](act)])

    if opts.last_logits:
        x = g.op("Slice", [x, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])])
    x = _rms_norm(g, x, "model.norm.weight", cfg.rms_norm_eps)
    return g.op("Identity", [lin["lm_head"](x)], out=names["logits"])


def _decoder_body_gqa(g: G, cfg: LlamaConfig, opts: BuildOptions, lin: dict, embed_fn, names: dict):
    """ONNX Runtime form of _decoder_body (optimum layout, batch rows without padding).

    GroupQueryAttention derives the past length from seqlens_k = sum(attention_mask) - 1 (as
    onnxruntime-genai's builder does) and total_sequence_length from the mask's shape, reads
    the query/key/value packed as the fused projection emits them, applies rotary from
    position_ids and the cos/sin tables, and writes present = past + new itself. Left-padded
    batches (zeros in attention_mask) are not honoured the way the plain graph does; emberd
    feeds batch 1 with an all-ones mask.
    """
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = float(cfg.rms_norm_eps)
    am = names["attention_mask"]
    seqlens_k = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [am, g.const([1])], keepdims=0), g.const(1)])],
                     to=TensorProto.INT32)                                            # [B]
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [am]), g.const(1)], axis=0)],
                 to=TensorProto.INT32)                                                # scalar
    # rotary tables as the plain graph computes them: f32 position * f32 inv_freq, then cos/sin
    fr = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None] * inv_freq(cfg)[None, :]
    g.init("rotary.cos_cache", np.cos(fr).astype(np.float32))                        # [max_pos, hd/2]
    g.init("rotary.sin_cache", np.sin(fr).astype(np.float32))
    # the 1/sqrt(hd) scale is folded into the Q weights when exact (see build_model)
    scale = 1.0 if _exact_q_scale(hd) else float(1.0 / np.sqrt(hd))

    def skip_norm(delta, resid, w):
        """RMSNorm(resid + delta) and the new residual stream, in one kernel."""
        nm = g.name("SkipSimplifiedLayerNormalization")
        out, _, _, s = g.op("SkipSimplifiedLayerNormalization", [delta, resid, w], name=nm,
                            out=[f"{nm}_out0", "", "", f"{nm}_sum"], domain="com.microsoft", epsilon=eps)
        return out, s

    x = embed_fn(g, names["input_ids"])
    h = g.op("SimplifiedLayerNormalization", [x, "model.layers.0.input_layernorm.weight"],
             axis=-1, epsilon=eps)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        qkv = lin[f"{p}.qkv"](h) if opts.fuse else g.op(
            "Concat", [lin[f"{p}.{c}"](h) for c in "qkv"], axis=-1)
        at = g.op("GroupQueryAttention",
                  [qkv, "", "", names[f"past_key.{i}"], names[f"past_value.{i}"], seqlens_k, total,
                   "rotary.cos_cache", "rotary.sin_cache", names["position_ids"]],
                  out=[f"{p}.attn_out", names[f"present_key.{i}"], names[f"present_value.{i}"]],
                  name=f"{p}.attn", domain="com.microsoft", num_heads=nh, kv_num_heads=nkv,
                  do_rotary=1, rotary_interleaved=0, scale=scale)[0]
        h, x = skip_norm(lin[f"{p}.o"](at), x, f"{p}.post_attention_layernorm.weight")
        if opts.fuse:
            gt, up = g.op("Split", [lin[f"{p}.gate_up"](h), g.const([cfg.intermediate_size] * 2)],
                          n_out=2, axis=-1)
        else:
            gt, up = lin[f"{p}.gate"](h), lin[f"{p}.up"](h)
        act = g.op("Mul", [g.op("Mul", [gt, g.op("Sigmoid", [gt])]), up])
        nxt = (f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_hidden_layers
               else "model.norm.weight")
        h, x = skip_norm(lin[f"{p}.down"](act), x, nxt)
    if opts.last_logits:
        h = g.op("Slice", [h, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])])
    return g.op("Identity", [lin["lm_head"](h)], out=names["logits"])


def build_model(cfg: LlamaConfig, weights: dict, opts: BuildOptions) -> onnx.ModelProto:
    """weights: HF-order names -> F32W/Q41W/Q80W/QKW (linears, [N, K]) or np.ndarray (norms,
    biases).

    Keys: model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied),
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight,
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
    and where the model has them (Qwen2) model.layers.{i}.self_attn.{q,k,v}_proj.bias
    """
    g = G()
    L = cfg.num_hidden_layers
    lin: Dict[str, Linear] = {}
    qs = _exact_q_scale(cfg.head_dim)
    if qs is not None:  # fold the attention scale into the Q projection (exact: power of two)
        weights = dict(weights)
        for i in range(L):
            for kind in ("weight", "bias"):
                k = f"model.layers.{i}.self_attn.q_proj.{kind}"
                if k in weights:
                    weights[k] = scale_rows(weights[k], qs)

    def fused(names, name):
        """One Linear over the stacked weights, or, where their forms differ (Q4_K_M: Q4_K q/k
        beside a Q6_K v), one per weight with the outputs concatenated: no weight changes form."""
        ws = [weights[f"{n}.weight"] for n in names]
        bs = [weights.get(f"{n}.bias") for n in names]
        if same_form(ws):
            bias = None
            if any(b is not None for b in bs):
                bias = np.concatenate([np.zeros(w.shape[0], np.float32) if b is None else b
                                       for w, b in zip(ws, bs)])
            return Linear(g, concat_rows(ws), name, opts, bias)
        return Stacked([Linear(g, w, n, opts, b) for n, w, b in zip(names, ws, bs)])

    for i in range(L):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        for n in ("input_layernorm", "post_attention_layernorm"):
            g.init(f"{p}.{n}.weight", np.asarray(weights[f"{p}.{n}.weight"], np.float32))
        if opts.fuse:
            lin[f"{p}.qkv"] = fused([f"{a}.{x}_proj" for x in "qkv"], f"{a}.qkv_proj")
            lin[f"{p}.gate_up"] = fused([f"{m}.gate_proj", f"{m}.up_proj"], f"{m}.gate_up_proj")
        else:
            for x in "qkv":
                lin[f"{p}.{x}"] = Linear(g, weights[f"{a}.{x}_proj.weight"], f"{a}.{x}_proj", opts,
                                         weights.get(f"{a}.{x}_proj.bias"))
            lin[f"{p}.gate"] = Linear(g, weights[f"{m}.gate_proj.weight"], f"{m}.gate_proj", opts)
            lin[f"{p}.up"] = Linear(g, weights[f"{m}.up_proj.weight"], f"{m}.up_proj", opts)
        lin[f"{p}.o"] = Linear(g, weights[f"{a}.o_proj.weight"], f"{a}.o_proj", opts)
        lin[f"{p}.down"] = Linear(g, weights[f"{m}.down_proj.weight"], f"{m}.down_proj", opts)
    g.init("model.norm.weight", np.asarray(weights["model.norm.weight"], np.float32))

    emb_w = weights["model.embed_tokens.weight"]
    tied = "lm_head.weight" not in weights
    head = Linear(g, emb_w if tied else weights["lm_head.weight"], "lm_head", opts)
    lin["lm_head"] = head
    if tied and head.kind != "f32":
        # gqa (ONNX Runtime only): the embedding reads the head's tables under other names, so
        # the head's raw copy is freed once prepacked (with external data the table is then
        # paged in only where gathered); the plain graph stays as tract has always loaded it
        alias = ".embed" if opts.attention == "gqa" else ""

        def embed_fn(gg, ids):
            return head.gather_rows(ids, alias)
    elif not tied and kept_quantized(emb_w, opts):
        lin["embed"] = Linear(g, emb_w, "model.embed_tokens", opts)  # only its gather path is used

        def embed_fn(gg, ids):
            return lin["embed"].gather_rows(ids)
    else:
        if not tied:
            g.init("model.embed_tokens.weight", emb_w.dequant() if hasattr(emb_w, "dequant")
                   else np.asarray(emb_w, np.float32))

        def embed_fn(gg, ids):
            # tied f32 head: gather from the transposed table (engines fold the Transpose)
            tbl = gg.op("Transpose", ["lm_head.weight_t"], perm=[1, 0]) if tied else "model.embed_tokens.weight"
            return gg.op("Gather", [tbl, ids], axis=0)

    nkv, hd, V = cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    B, Sd, Pd, Td = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, Sd]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, Td])]
    if opts.layout != "genai":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, Sd]))
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                        [B, nkv, Pd, hd]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             [B, 1 if opts.last_logits else Sd, V])]
    for i in range(L):
        for kv in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                         [B, nkv, Td, hd]))

    def io_names(prefix=""):
        n = {"input_ids": "input_ids", "attention_mask": "attention_mask",
             "position_ids": None if opts.layout == "genai" else "position_ids",
             "logits": prefix + "logits"}
        for i in range(L):
            n[f"past_key.{i}"] = f"past_key_values.{i}.key"
            n[f"past_value.{i}"] = f"past_key_values.{i}.value"
            n[f"present_key.{i}"] = f"{prefix}present.{i}.key"
            n[f"present_value.{i}"] = f"{prefix}present.{i}.value"
        return n

    if opts.attention == "gqa":
        if opts.layout != "optimum":
            raise ValueError("attention=gqa is built for the optimum layout only")
        _decoder_body_gqa(g, cfg, opts, lin, embed_fn, io_names())
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    elif opts.layout in ("optimum", "genai"):
        _decoder_body(g, cfg, opts, lin, embed_fn, io_names(), use_past=True)
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    elif opts.layout == "merged":
        inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
        branches = []
        for pre in ("with_past/", "no_past/"):
            sub = G(prefix=pre)
            # the Linear objects emit into `g`; rebind them to the subgraph for node emission
            for l_ in lin.values():
                l_.g = sub
            nm = io_names(pre)
            # Both branches concatenate the past (empty by contract when use_cache_branch is
            # false), so their output shapes agree: tract's If requires identical output facts
            # (an Optimum export's no-past branch yields [.., S, ..] and tract rejects it).
            _decoder_body(sub, cfg, opts, lin, embed_fn, nm, use_past=True)
            outs = [helper.make_tensor_value_info(nm["logits"], TensorProto.FLOAT, None)]
            for i in range(L):
                outs.append(helper.make_tensor_value_info(nm[f"present_key.{i}"], TensorProto.FLOAT, None))
                outs.append(helper.make_tensor_value_info(nm[f"present_value.{i}"], TensorProto.FLOAT, None))
            branches.append(helper.make_graph(sub.nodes, pre.strip("/"), [], outs, sub.inits))
        for l_ in lin.values():
            l_.g = g
        # If wants a scalar-ish condition; use_cache_branch is [1]
        cond = g.op("Squeeze", ["use_cache_branch", g.const([0])])
        g.nodes.append(helper.make_node("If", [cond], [o.name for o in outputs], name="optimum::if",
                                        then_branch=branches[0], else_branch=branches[1]))
        graph = helper.make_graph(g.nodes, "decoder_merged", inputs, outputs, g.inits)
    else:
        raise ValueError(opts.layout)

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MAIN_OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="emberd-models", doc_string=opts.doc)
    model.ir_version = 8
    return model


def save_model(model: onnx.ModelProto, path):
    """Single-file save (protobuf limit 2 GB is far above what this builds)."""
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- shared weights
def _varint(buf, i):
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, i


def _fields(buf, start, end):
    """(field number, wire type, payload start, payload end) of one protobuf message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, j = _varint(buf, i)
            yield num, wt, i, j
        elif wt == 1:
            j = i + 8
            yield num, wt, i, j
        elif wt == 2:
            n, i = _varint(buf, i)
            j = i + n
            yield num, wt, i, j
        elif wt == 5:
            j = i + 4
            yield num, wt, i, j
        else:
            raise ValueError(f"protobuf wire type {wt} at byte {i}")
        i = j


def raw_data_offsets(data: bytes) -> Dict[str, tuple]:
    """name -> (byte offset, length) of each initializer's raw_data in a serialized ONNX model."""
    buf = memoryview(data)
    out = {}
    for num, _, gs, ge in _fields(buf, 0, len(buf)):
        if num != 7:                                   # ModelProto.graph
            continue
        for gnum, _, ts, te in _fields(buf, gs, ge):
            if gnum != 5:                              # GraphProto.initializer
                continue
            name, raw = None, None
            for tnum, _, s, e in _fields(buf, ts, te):
                if tnum == 8:                          # TensorProto.name
                    name = bytes(buf[s:e]).decode()
                elif tnum == 9:                        # TensorProto.raw_data
                    raw = (s, e - s)
            if name is not None and raw is not None:
                out[name] = raw
    return out


def _point_at(t: onnx.TensorProto, location: str, offset: int, length: int):
    """Makes initializer `t` ONNX external data: `length` bytes at `offset` in `location`."""
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def share_weights(model: onnx.ModelProto, base_path, min_bytes=1024) -> int:
    """Point `model`'s initializers at byte-identical tensors inside the saved ONNX file
    `base_path` (ONNX external data with that file as location, matched by content), so a
    second graph over the same weights adds no weight bytes on disk. The base file stays an
    ordinary self-contained model. Returns the number of distinct bytes referenced."""
    base_path = Path(base_path)
    data = base_path.read_bytes()
    by_content = {}
    for off, n in raw_data_offsets(data).values():
        by_content.setdefault((n, hashlib.sha256(data[off:off + n]).digest()), (off, n))
    shared = set()
    for t in model.graph.initializer:
        if len(t.raw_data) < min_bytes:
            continue
        ref = by_content.get((len(t.raw_data), hashlib.sha256(t.raw_data).digest()))
        if ref is None:
            continue
        _point_at(t, base_path.name, *ref)
        shared.add(ref)
    return sum(n for _, n in shared)


def externalize_rest(model: onnx.ModelProto, data_path, min_bytes=1024, align=4096) -> int:
    """Move `model`'s remaining large inline initializers into the file `data_path` (ONNX
    external data), one copy per distinct content, so two names for one table (G.alias) cost
    its bytes once. Offsets are page-aligned, so ONNX Runtime can map them. Returns the bytes
    written (0: no file)."""
    data_path = Path(data_path)
    placed, buf = {}, bytearray()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < min_bytes:
            continue
        key = (len(t.raw_data), hashlib.sha256(t.raw_data).digest())
        if key not in placed:
            buf.extend(b"\0" * (-len(buf) % align))
            placed[key] = len(buf)
            buf.extend(t.raw_data)
        _point_at(t, data_path.name, placed[key], len(t.raw_data))
    if buf:
        data_path.write_bytes(bytes(buf))
    elif data_path.exists():
        data_path.unlink()
    return len(buf)
