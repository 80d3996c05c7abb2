#!/usr/bin/env python3
"""Convert a Llama-family GGUF (byte-level BPE vocabulary) into an emberd model package.

    python models/convert_gguf.py --gguf X.gguf --out DIR

Writes into DIR: model.onnx (tract; plain ONNX ops), model.ort.onnx (ONNX Runtime: the same
weights and I/O with its fused GroupQueryAttention/SimplifiedLayerNormalization ops; its
weights are external data pointing into model.onnx, so it adds ~2 MB), emberd.json,
tokenizer.json, tokenizer_config.json, generation_config.json, config.json and reference.json
(greedy generations from onnxruntime on model.ort.onnx). Architectures: llama (with Llama 3's
rope_freqs or linear rope scaling), mistral, qwen2 (q/k/v biases). Weights, each exact:
Q4_0/Q4_1/Q4_K become 4-bit MatMulNBits (with a block-sum term for the mins), Q8_0 a pair of
4-bit planes, Q5_0/Q5_1/Q5_K/Q6_K 8-bit MatMulNBits with zero points (split into 4-bit planes in
model.tract.onnx: tract has 4-bit MatMulNBits only), F16/F32 stay f32; other quantization types
are dequantized to f32.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_onnx as lo  # noqa: E402

FORMAT = 1

# llama.cpp pre-tokenizer names -> Hugging Face pre_tokenizer objects
_GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = {
    "type": "Split",
    "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
    "behavior": "Isolated", "invert": False}
PRE_TOKENIZERS = {
    # SmolLM / StarCoder: every digit on its own, then the GPT-2 regex
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _GPT2_BYTELEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _GPT2_BYTELEVEL]},
    "gpt2": _GPT2_BYTELEVEL,
    "default": _GPT2_BYTELEVEL,
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        _LLAMA3_SPLIT, {**_GPT2_BYTELEVEL, "use_regex": False}]},
    # Qwen2: Llama 3's split with single digits
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {**_LLAMA3_SPLIT, "pattern": {"Regex": _LLAMA3_SPLIT["pattern"]["Regex"].replace(
            "\\p{N}{1,3}", "\\p{N}")}},
        {**_GPT2_BYTELEVEL, "use_regex": False}]},
}
# Normalizers the Hugging Face tokenizer of a pre-tokenizer's models has (Qwen2's NFC)
NORMALIZERS = {"qwen2": {"type": "NFC"}}

# general.architecture values read, with the Hugging Face class and model_type they become
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
                 "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# GGUF tensor types the converter keeps exact (the rest are dequantized to f32)
EXACT_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def sha256_file(path, bufsize=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------- GGUF reading
def _f16(a):
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _weight_from_tensor(t):
    """GGUF tensor -> lo.F32W/Q41W/Q80W in [N, K] row layout."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    tt = t.tensor_type
    raw = np.asarray(t.data)
    if tt == QT.F32:
        return lo.F32W(raw.astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0])))
    if tt == QT.F16:
        return lo.F32W(raw.astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0])))
    N, K = int(t.shape[1]), int(t.shape[0])
    nb = K // lo.QK
    if tt == QT.Q4_1:
        blk = raw.reshape(N, nb, 20)
        d, m, qs = _f16(blk[:, :, 0:2]), _f16(blk[:, :, 2:4]), blk[:, :, 4:20]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)   # j, j+16
        return lo.Q41W(d.reshape(N, nb), m.reshape(N, nb), q)
    if tt == QT.Q4_0:
        blk = raw.reshape(N, nb, 18)
        d, qs = _f16(blk[:, :, 0:2]).reshape(N, nb), blk[:, :, 2:18]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)
        return lo.Q41W(d, -8.0 * d, q)                                          # d*(q-8)
    if tt == QT.Q8_0:
        blk = raw.reshape(N, nb, 34)
        d, qs = _f16(blk[:, :, 0:2]).reshape(N, nb), blk[:, :, 2:34]
        return lo.Q80W(d, np.ascontiguousarray(qs).view(np.int8))
    if tt in (QT.Q5_0, QT.Q5_1):
        # llama.cpp's fallback for rows that are not a whole number of k-quant super-blocks
        size = 22 if tt == QT.Q5_0 else 24
        blk = raw.reshape(N, nb, size)
        d = _f16(blk[:, :, 0:2]).reshape(N, nb)
        qh = np.ascontiguousarray(blk[:, :, size - 20:size - 16]).view("<u4")           # [N, nb, 1]
        qs = blk[:, :, size - 16:].reshape(N, nb, 1, 16)
        low = np.concatenate([qs & 0xF, qs >> 4], 2).reshape(N, nb, 32)                # j, j+16
        high = (qh >> np.arange(32, dtype=np.uint32)) & 1                              # bit j: element j
        q = (low + 16 * high).astype(np.uint8)
        if tt == QT.Q5_0:
            return lo.QKW(d, 16, None, q, 5)                                          # d*(q-16)
        return lo.QKW(d, 0, _f16(blk[:, :, 2:4]).reshape(N, nb), q, 5)                # d*q + m
    if tt in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return _k_quant(tt.name, raw, N, K)
    print(f"  note: {t.name} is {tt.name}; stored dequantized (f32)", file=sys.stderr)
    w = gguf.quants.dequantize(raw, tt)
    return lo.F32W(np.asarray(w, np.float32).reshape(N, K))


QK_K = 256  # a k-quant super-block


def _k_scales(scales):
    """The 6-bit scales and mins of a Q4_K/Q5_K super-block's 8 sub-blocks (llama.cpp's
    get_scale_min_k4): [..., 12] bytes -> ([..., 8], [..., 8]) uint8."""
    s = scales.astype(np.uint8)
    lo4, hi4 = s[..., 0:4], s[..., 4:8]
    sc = np.concatenate([lo4 & 63, (s[..., 8:12] & 0xF) | ((lo4 >> 6) << 4)], -1)
    mn = np.concatenate([hi4 & 63, (s[..., 8:12] >> 4) | ((hi4 >> 6) << 4)], -1)
    return sc, mn


def _k_quant(kind, raw, N, K):
    """A Q4_K/Q5_K/Q6_K tensor as llama.cpp decodes it, in a form the graph holds exactly:
    Q4_K -> Q41W (blocks of 32: scale d*sc, min -dmin*m), Q5_K -> QKW 5-bit (same blocks),
    Q6_K -> QKW 6-bit (blocks of 16: scale d*sc, zero point 32)."""
    if K % QK_K:
        raise SystemExit(f"a {kind} row of {K} values is not a whole number of {QK_K}-value super-blocks")
    ns = K // QK_K
    if kind in ("Q4_K", "Q5_K"):
        size = 144 if kind == "Q4_K" else 176
        blk = raw.reshape(N, ns, size)
        d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])                  # [N, ns, 1]
        sc, mn = _k_scales(blk[..., 4:16])                                   # [N, ns, 8]
        qs = blk[..., size - 128:].reshape(N, ns, 4, 1, 32)                  # 4 chunks of 64
        q = np.concatenate([qs & 0xF, qs >> 4], 3).reshape(N, ns, 8, 32)     # sub-block 2c, 2c+1
        scale = (d * sc.astype(np.float32)).reshape(N, ns * 8)
        minus = (-(dmin * mn.astype(np.float32))).reshape(N, ns * 8)
        if kind == "Q4_K":
            return lo.Q41W(scale, minus, q.reshape(N, ns * 8, 32).astype(np.uint8))
        qh = blk[..., 16:48].reshape(N, ns, 1, 32)                           # bit j: sub-block j
        high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
        q = (q + 16 * high).astype(np.uint8)
        return lo.QKW(scale, 0, minus, q.reshape(N, ns * 8, 32), 5)
    blk = raw.reshape(N, ns, 210)
    ql = blk[..., 0:128].reshape(N, ns, 2, 2, 32)      # [half, ql[l] | ql[l+32], l]
    qh = blk[..., 128:192].reshape(N, ns, 2, 1, 32)    # [half, l]
    sc = np.ascontiguousarray(blk[..., 192:208]).view(np.int8)                # [N, ns, 16]
    d = _f16(blk[..., 208:210])                                              # [N, ns, 1]
    # in each half of 128: elements l, l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l]
    # high, ql[l+32] high nibbles, and bits 0-1, 2-3, 4-5, 6-7 of qh[l]
    low = np.concatenate([ql & 0xF, ql >> 4], 3)                             # [N, ns, 2, 4, 32]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).astype(np.uint8)
    scale = (d * sc.astype(np.float32)).reshape(N, ns * 16)
    return lo.QKW(scale, 32, None, q.reshape(N, ns * 16, 16), 6)


def unpermute_rows(w, n_head: int):
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half halves).

    In the GGUF, row h*hd + 2j + s of a head holds Hugging Face row h*hd + s*hd/2 + j.
    """
    n = w.shape[0]
    hd = n // n_head
    h, s, j = np.meshgrid(np.arange(n_head), np.arange(2), np.arange(hd // 2), indexing="ij")
    idx = (h * hd + 2 * j + s).reshape(-1)
    return w.take_rows(idx)


def _field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path):
    import gguf
    r = gguf.GGUFReader(str(path))
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise SystemExit(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    a = arch
    nh = int(_field(r, f"{a}.attention.head_count"))
    nkv = int(_field(r, f"{a}.attention.head_count_kv", nh))
    H = int(_field(r, f"{a}.embedding_length"))
    hd = int(_field(r, f"{a}.attention.key_length", H // nh))
    rope_dim = int(_field(r, f"{a}.rope.dimension_count", hd))
    if rope_dim != hd:
        raise SystemExit(f"{path}: partial rotary (rope dim {rope_dim} != head dim {hd}) is not supported")
    tensors = {t.name: t for t in r.tensors}
    # Llama 3 divides each rotary frequency by its factor in rope_freqs; linear scaling by one
    rope_factors = None
    if "rope_freqs.weight" in tensors:
        rope_factors = np.asarray(tensors["rope_freqs.weight"].data, np.float32).reshape(-1)
        if rope_factors.shape != (hd // 2,):
            raise SystemExit(f"{path}: rope_freqs has {rope_factors.size} factors, want {hd // 2}")
    scaling = _field(r, f"{a}.rope.scaling.type")
    if scaling == "linear":
        factor = float(_field(r, f"{a}.rope.scaling.factor", 1.0))
        rope_factors = (rope_factors if rope_factors is not None else np.ones(hd // 2, np.float32)) * factor
    elif scaling not in (None, "none"):
        raise SystemExit(f"{path}: rope scaling {scaling!r} is not supported (none, linear, and Llama 3's "
                         "rope_freqs are)")
    toks = _field(r, "tokenizer.ggml.tokens")
    vocab = int(_field(r, f"{a}.vocab_size", len(toks)))
    cfg = lo.LlamaConfig(
        num_hidden_layers=int(_field(r, f"{a}.block_count")),
        hidden_size=H, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
        intermediate_size=int(_field(r, f"{a}.feed_forward_length")),
        vocab_size=vocab,
        rope_theta=float(_field(r, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(np.float32(_field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-5))),
        max_position_embeddings=int(_field(r, f"{a}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_factors=rope_factors,
    )
    # llama.cpp permutes Llama's Q/K rows for its interleaved rotary; Qwen2 (NEOX rotary, the
    # rotate-half of Hugging Face) is stored as trained
    permuted = arch != "qwen2"
    W = {}
    W["model.embed_tokens.weight"] = _weight_from_tensor(tensors["token_embd.weight"])
    W["model.norm.weight"] = np.asarray(tensors["output_norm.weight"].data, np.float32)
    if "output.weight" in tensors:
        W["lm_head.weight"] = _weight_from_tensor(tensors["output.weight"])
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        W[f"{p}.input_layernorm.weight"] = np.asarray(tensors[f"blk.{i}.attn_norm.weight"].data, np.float32)
        W[f"{p}.post_attention_layernorm.weight"] = np.asarray(tensors[f"blk.{i}.ffn_norm.weight"].data,
                                                               np.float32)
        for g_name, hf in names.items():
            w = _weight_from_tensor(tensors[f"blk.{i}.{g_name}.weight"])
            if permuted and g_name == "attn_q":
                w = unpermute_rows(w, nh)
            elif permuted and g_name == "attn_k":
                w = unpermute_rows(w, nkv)
            W[f"{p}.{hf}.weight"] = w
            bias = tensors.get(f"blk.{i}.{g_name}.bias")
            if bias is not None:
                if g_name not in ("attn_q", "attn_k", "attn_v"):
                    raise SystemExit(f"{path}: a bias on {g_name} is not supported (q/k/v biases are)")
                b = np.asarray(bias.data, np.float32).reshape(-1)
                if permuted and g_name in ("attn_q", "attn_k"):
                    b = unpermute_rows(lo.F32W(b[:, None]), nh if g_name == "attn_q" else nkv).a[:, 0]
                W[f"{p}.{hf}.bias"] = b
    tok = {
        "model": _field(r, "tokenizer.ggml.model"),
        "pre": _field(r, "tokenizer.ggml.pre", "default"),
        "tokens": toks,
        "types": [int(x) for x in _field(r, "tokenizer.ggml.token_type", [1] * len(toks))],
        "merges": _field(r, "tokenizer.ggml.merges", []),
        "bos": _field(r, "tokenizer.ggml.bos_token_id"),
        "eos": _field(r, "tokenizer.ggml.eos_token_id"),
        "unk": _field(r, "tokenizer.ggml.unknown_token_id"),
        "pad": _field(r, "tokenizer.ggml.padding_token_id"),
        "eot": _field(r, "tokenizer.ggml.eot_token_id"),
        "add_bos": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(r, "tokenizer.chat_template"),
    }
    meta = {"name": _field(r, "general.name", Path(path).stem), "arch": arch}
    return cfg, W, tok, meta


# ----------------------------------------------------------------------------- tokenizer files
def tokenizer_json(tok) -> dict:
    if tok["model"] != "gpt2":
        raise SystemExit(f"tokenizer model {tok['model']!r} is not byte-level BPE (gpt2); not supported")
    pre = PRE_TOKENIZERS.get(tok["pre"])
    if pre is None:
        raise SystemExit(f"pre-tokenizer {tok['pre']!r} unknown; known: {sorted(PRE_TOKENIZERS)}")
    added = []
    for i, (t, ty) in enumerate(zip(tok["tokens"], tok["types"])):
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": ty != TOKEN_TYPE_CONTROL, "special": ty == TOKEN_TYPE_CONTROL})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": NORMALIZERS.get(tok["pre"]),
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tok["tokens"])},
                  "merges": list(tok["merges"])},
    }


def _tok_str(tok, i):
    return None if i is None else tok["tokens"][int(i)]


def tokenizer_config(tok, max_len) -> dict:
    specials = {i: t for i, (t, ty) in enumerate(zip(tok["tokens"], tok["types"]))
                if ty == TOKEN_TYPE_CONTROL}
    cfg = {
        "add_bos_token": tok["add_bos"],
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": _tok_str(tok, tok["bos"]),
        "eos_token": _tok_str(tok, tok["eos"]),
        "pad_token": _tok_str(tok, tok["pad"] if tok["pad"] is not None else tok["eos"]),
        "unk_token": _tok_str(tok, tok["unk"]),
        "chat_template": tok["chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i, t in specials.items()},
        "additional_special_tokens": [t for t in specials.values()
                                      if t not in (_tok_str(tok, tok["bos"]), _tok_str(tok, tok["eos"]),
                                                   _tok_str(tok, tok["unk"]))],
    }
    return cfg


def eos_ids(tok):
    ids = [int(tok["eos"])]
    for extra in (tok.get("eot"),):
        if extra is not None and int(extra) not in ids:
            ids.append(int(extra))
    # <|endoftext|> also ends a turn for the ChatML-style models (SmolLM2)
    if "<|endoftext|>" in tok["tokens"]:
        i = tok["tokens"].index("<|endoftext|>")
        if i not in ids and tok["types"][i] == TOKEN_TYPE_CONTROL:
            ids.append(i)
    return ids


def config_json(cfg: lo.LlamaConfig, tok, arch: str = "llama") -> dict:
    hf_class, model_type = ARCHITECTURES[arch]
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        # Llama 3's factors are what its rope_scaling parameters compute; they are kept as is
        "rope_scaling": None,
        **({"rope_factors": [float(f) for f in cfg.rope_factors]} if cfg.rope_factors is not None else {}),
        "rms_norm_eps": float(f"{cfg.rms_norm_eps:.6g}"),
        "bos_token_id": None if tok["bos"] is None else int(tok["bos"]),
        "eos_token_id": int(tok["eos"]),
        "pad_token_id": None if tok["pad"] is None else int(tok["pad"]),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    }


def generation_config(tok) -> dict:
    ids = eos_ids(tok)
    return {"bos_token_id": None if tok["bos"] is None else int(tok["bos"]),
            "eos_token_id": ids[0] if len(ids) == 1 else ids,
            "pad_token_id": None if tok["pad"] is None else int(tok["pad"]),
            "do_sample": False}


# ----------------------------------------------------------------------------- chat template
def render_chat(template: str, messages, add_generation_prompt=True, bos_token="", eos_token=""):
    """Hugging Face semantics: trim_blocks, lstrip_blocks, raise_exception defined."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)


# ----------------------------------------------------------------------------- running (ORT)
def ort_session(model_path, threads=2):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


class OrtDecoder:
    """Prefill-then-step driver for the Optimum / merged / genai layouts (batch 1)."""

    def __init__(self, sess, cfg: lo.LlamaConfig):
        self.s, self.cfg = sess, cfg
        self.in_names = {i.name for i in sess.get_inputs()}
        self.out_names = [o.name for o in sess.get_outputs()]
        # the cache in the graph's own type: f16 in half-precision exports (model_q4f16.onnx)
        ty = next((i.type for i in sess.get_inputs() if i.name == "past_key_values.0.key"), "")
        self.kv_dtype = np.float16 if "float16" in ty else np.float32

    def empty_past(self):
        c = self.cfg
        z = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), self.kv_dtype)
        return [(z, z) for _ in range(c.num_hidden_layers)]

    def forward(self, ids, past):
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        P, S = past[0][0].shape[2], ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, P + S), np.int64)}
        if "position_ids" in self.in_names:
            feed["position_ids"] = np.arange(P, P + S, dtype=np.int64).reshape(1, S)
        if "use_cache_branch" in self.in_names:
            feed["use_cache_branch"] = np.array([P > 0])
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = k
            feed[f"past_key_values.{i}.value"] = v
        outs = dict(zip(self.out_names, self.s.run(None, feed)))
        new = [(outs[f"present.{i}.key"], outs[f"present.{i}.value"]) for i in range(len(past))]
        return outs["logits"], new

    def greedy(self, prompt_ids, steps, eos=()):
        """Returns (generated ids, list of last-position logits per step, prefill first)."""
        past = self.empty_past()
        logits, past = self.forward(prompt_ids, past)
        out, step_logits = [], []
        for _ in range(steps):
            last = logits[0, -1].astype(np.float32)
            step_logits.append(last)
            t = int(np.argmax(last))
            out.append(t)
            if t in eos:
                break
            logits, past = self.forward([t], past)
        return out, step_logits


REFERENCE_PROMPTS = [
    {"system": None, "messages": [{"role": "user", "content": "Tell me about Paris, the capital of France."}]},
    {"system": "You are a helpful assistant who explains things simply.",
     "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
    {"system": None, "messages": [{"role": "user", "content": "Give me three tips for staying healthy."}]},
    {"system": None, "messages": [
        {"role": "user", "content": "Hi! Can you help me with a recipe?"},
        {"role": "assistant", "content": "Of course! What would you like to cook?"},
        {"role": "user", "content": "How do I make a simple tomato soup?"}]},
]


def _top(step_logits, k=5):
    out = []
    for l in step_logits:
        idx = np.argsort(-l, kind="stable")[:k]
        out.append([[int(i), round(float(l[i]), 4)] for i in idx])
    return out


def write_reference(out: Path, model_file: str, cfg, tok, exact_weights=None, exact_opts=None, max_new=64):
    """reference.json: greedy generations with onnxruntime on `model_file`; with `exact_weights`
    also `greedy_ids_exact` from the same weights in the plain graph at MatMulNBits
    accuracy_level 0 (no int8 activation quantization: what tract computes)."""
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = set(eos_ids(tok))
    prompts = []
    for p in REFERENCE_PROMPTS:
        msgs = ([{"role": "system", "content": p["system"]}] if p["system"] else []) + p["messages"]
        text = render_chat(tok["chat_template"], msgs, True, _tok_str(tok, tok["bos"]) or "",
                           _tok_str(tok, tok["eos"]) or "")
        ids = tk.encode(text, add_special_tokens=False).ids
        prompts.append({"messages": p["messages"], "system": p["system"], "text": text, "prompt_ids": ids})
    dec = OrtDecoder(ort_session(out / model_file), cfg)
    for p in prompts:
        gen, lg = dec.greedy(p["prompt_ids"], max_new, eos)
        p.update(greedy_ids=gen, greedy_text=tk.decode(gen, skip_special_tokens=False),
                 stopped_at_eos=bool(gen and gen[-1] in eos), step_top=_top(lg))
    del dec
    if exact_weights is not None:
        tmp = out / ".exact.tmp.onnx"
        lo.save_model(lo.build_model(cfg, exact_weights, exact_opts or lo.BuildOptions(accuracy_level=0)), tmp)
        dec = OrtDecoder(ort_session(tmp), cfg)
        for p in prompts:
            gen, lg = dec.greedy(p["prompt_ids"], max_new, eos)
            p.update(greedy_ids_exact=gen, greedy_text_exact=tk.decode(gen, skip_special_tokens=False),
                     step_top_exact=_top(lg))
        del dec
        tmp.unlink()
    ref = {"engine": "onnxruntime (Python), CPU, greedy, batch 1, prefill then 1-token steps",
           "model_file": model_file, "max_new_tokens": max_new, "eos_token_ids": sorted(eos),
           "note": "greedy_ids: model_file as shipped (MatMulNBits accuracy_level 4, int8 activations "
                   "in ONNX Runtime). greedy_ids_exact: same weights in the plain graph (files.tract), "
                   "accuracy_level 0 (f32 activations), which is what tract computes. Runs stop at an eos id (included). "
                   "step_top[_exact]: per generated token, the 5 best [id, logit] of that step "
                   "(prefill first), for tolerance-aware comparisons: greedy runs on other CPUs "
                   "may part ways where the top two logits are close.",
           "prompts": prompts}
    (out / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    return ref


# ----------------------------------------------------------------------------- package
def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def tract_loadable(opts: lo.BuildOptions, W: dict) -> bool:
    """Whether tract computes model.onnx as written: tract 0.23.9 runs MatMulNBits with bits 4
    (and 2) only, cannot slice its packed weights, and packs blocks of 32 with f16 scales."""
    if opts.q8 not in ("split4", "f32"):
        return False
    for w in W.values():
        if isinstance(w, lo.QKW) and opts.kq not in ("split4", "f32"):
            return False
        # only blocks of 32 are packed (Q6_K's blocks of 16 run in f32)
        scales = w.d if isinstance(w, lo.Q41W) else w.s if isinstance(w, lo.QKW) and w.block == lo.QK else None
        if scales is not None and not opts.f16_scales and \
                not np.array_equal(scales, scales.astype(np.float16).astype(np.float32)):
            return False
    return True


def tract_options(opts: lo.BuildOptions) -> lo.BuildOptions:
    """model.tract.onnx: 8-bit weights split into 4-bit planes, scales as tract holds them."""
    return dataclasses.replace(opts, q8="split4", kq="split4", f16_scales=True)


def ort_options(opts: lo.BuildOptions) -> lo.BuildOptions:
    """model.ort.onnx: 8-bit weights as one 8-bit MatMulNBits, whatever form model.onnx keeps
    them in for tract. ONNX Runtime 1.32 multiplies 8-bit blocks with int8 activations in one
    pass; two 4-bit planes cost two (SmolLM2's Q8_0 head: 5-8 % of a decode step)."""
    return dataclasses.replace(opts, attention="gqa",
                               q8="nbits8" if opts.q8 == "split4" else opts.q8,
                               kq="nbits8" if opts.kq == "split4" else opts.kq)


def write_ort_graph(out: Path, cfg, W, opts: lo.BuildOptions, base="model.onnx", name="model.ort.onnx"):
    """The ONNX Runtime graph (GroupQueryAttention etc.) over the weights already in `base`;
    the tensors `base` does not hold (its own forms of 8-bit weights) go to `name`.data.
    Returns (bytes read from base, bytes in the data file)."""
    m = lo.build_model(cfg, W, ort_options(opts))
    shared = lo.share_weights(m, out / base)
    own = lo.externalize_rest(m, out / f"{name}.data")
    lo.save_model(m, out / name)
    return shared, own


def convert(gguf_path, out, name=None, opts: lo.BuildOptions = None, reference=True, ort_graph="gqa",
            last_logits=True, log=print):
    gguf_path, out = Path(gguf_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"[convert] reading {gguf_path.name}")
    cfg, W, tok, meta = read_gguf(gguf_path)
    # a copy: the caller's options stay as they were
    opts = dataclasses.replace(opts or lo.BuildOptions(), last_logits=last_logits)
    name = name or gguf_path.stem.lower()
    log(f"[convert] {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads}, vocab {cfg.vocab_size}; building graph "
        f"(linear={opts.linear}, q8={opts.q8}, accuracy_level={opts.accuracy_level})")
    opts.doc = f"emberd package {name} from {gguf_path.name}"
    lo.save_model(lo.build_model(cfg, W, opts), out / "model.onnx")
    files = {"ort": "model.onnx", "tract": "model.onnx"}
    log(f"[convert] wrote model.onnx ({(out / 'model.onnx').stat().st_size / 1e6:.1f} MB)")
    if not tract_loadable(opts, W):
        # a second file in the form tract runs as written
        t_opts = tract_options(opts)
        lo.save_model(lo.build_model(cfg, W, t_opts), out / "model.tract.onnx")
        files["tract"] = "model.tract.onnx"
        log(f"[convert] wrote model.tract.onnx ({(out / 'model.tract.onnx').stat().st_size / 1e6:.1f} MB)")
    if ort_graph == "gqa":
        shared, own = write_ort_graph(out, cfg, W, opts)
        files["ort"] = "model.ort.onnx"
        log(f"[convert] wrote model.ort.onnx ({(out / 'model.ort.onnx').stat().st_size / 1e6:.1f} MB, "
            f"{shared / 1e6:.1f} MB of weights read from model.onnx"
            + (f", {own / 1e6:.1f} MB of its own in model.ort.onnx.data)" if own else ")"))
    write_json(out / "tokenizer.json", tokenizer_json(tok))
    write_json(out / "tokenizer_config.json", tokenizer_config(tok, cfg.max_position_embeddings))
    write_json(out / "config.json", config_json(cfg, tok, meta["arch"]))
    write_json(out / "generation_config.json", generation_config(tok))
    manifest = {"format": FORMAT, "name": name, "files": files,
                "layout": "optimum",
                "source": {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path)},
                "weights": {"linear": opts.linear, "q8": opts.q8, "kq": opts.kq,
                            "accuracy_level": opts.accuracy_level}}
    write_json(out / "emberd.json", manifest)
    t1 = time.time()
    log(f"[convert] package written in {t1 - t0:.1f} s")
    if reference:
        log("[convert] greedy reference generations (onnxruntime)")
        ref = write_reference(out, files["ort"], cfg, tok, exact_weights=W if opts.accuracy_level else None,
                              exact_opts=dataclasses.replace(opts, accuracy_level=0, accuracy_overrides={}))
        for p in ref["prompts"]:
            log(f"    {p['messages'][-1]['content'][:40]!r} -> {p['greedy_text'][:70]!r}...")
        log(f"[convert] reference.json in {time.time() - t1:.1f} s")
    return cfg, tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="input GGUF file (Llama family, byte-level BPE vocab)")
    ap.add_argument("--out", required=True, help="output package directory")
    ap.add_argument("--name", help="package name (default: GGUF file stem)")
    ap.add_argument("--linear", default="nbits", choices=["nbits", "f32"], help="form of 4-bit weights")
    ap.add_argument("--q8", default="split4", choices=["split4", "nbits8", "f32"], help="form of Q8_0 weights")
    ap.add_argument("--kq", default="nbits8", choices=["nbits8", "split4", "f32"],
                    help="form of Q5_0/Q5_1/Q5_K/Q6_K weights in model.onnx (model.tract.onnx splits them)")
    ap.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (ORT)")
    ap.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up projections separate")
    ap.add_argument("--no-reference", action="store_true", help="skip reference.json generation")
    ap.add_argument("--ort-graph", default="gqa", choices=["gqa", "same"],
                    help="gqa: model.ort.onnx with ONNX Runtime's fused ops for files.ort; same: model.onnx")
    ap.add_argument("--full-logits", action="store_true",
                    help="both graphs return logits for every position, as Optimum exports do "
                         "(default: [batch, 1, vocab] of the last position, which is all emberd reads; "
                         "computing the others costs prefill time and memory)")
    a = ap.parse_args(argv)
    opts = lo.BuildOptions(linear=a.linear, q8=a.q8, kq=a.kq, accuracy_level=a.accuracy_level,
                           fuse=not a.no_fuse)
    convert(a.gguf, a.out, a.name, opts, reference=not a.no_reference, ort_graph=a.ort_graph,
            last_logits=not a.full_logits)


if __name__ == "__main__":
    main()
