#!/usr/bin/env python3
"""Generate the tiny test model packages (deterministic, no downloads, a few seconds).

    python models/make_test_models.py [--out models/test/generated]

Writes <out>/{optimum,optimum-merged,genai,q4}/: 2 layers, hidden 64, 4 heads, 2 KV heads,
head_dim 16, a byte-level BPE tokenizer of 384 tokens (3 special + 256 bytes + 125 merges)
with SmolLM2's chat template, config/generation_config, and reference.json:

    {"cases": [{"prompt_ids": [...], "steps": N, "greedy_ids": [...],
                "step_logits": [[vocab floats of the last position per step, prefill first]]}]}

computed with onnxruntime (prefill, then one token per step with the KV cache). The q4 package
is made from a tiny GGUF (Q4_1 linears, Q8_0 tied embedding; kept as q4/source.gguf) through
convert_gguf.py, so it has exactly the default model's form (model.onnx for tract,
model.ort.onnx with GroupQueryAttention for ONNX Runtime, which the references come from); its
cases also hold `greedy_ids_exact` and `step_logits_exact` (accuracy_level 0, i.e. no
activation quantization, which is what tract computes). kq-llama3 and kq-qwen2 come the same
way from GGUFs in the k-quant mixes of Q4_K_M and Q5_K_M files (hidden 256, head_dim 64,
intermediate 512): Llama 3 with rope_freqs, Qwen2 with q/k/v biases and an untied embedding.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_gguf as cg  # noqa: E402
import llama_onnx as lo  # noqa: E402

SEED = 20240611
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_MERGES = 125
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = """\
system You are a helpful AI assistant named SmolLM, trained by Hugging Face
user Hello! How are you today? assistant I am fine, thank you. How can I help you?
user What is the capital of France? assistant The capital of France is Paris.
The quick brown fox jumps over the lazy dog. The weather is nice and the sun is shining.
def main():\n    print("hello world")\n    return 0\n
for i in range(10):\n    total = total + i\n
Please write a short story about a robot that learns to paint the sea and the sky.
There are many things to learn, and the best way to learn them is to practice every day.
"""

TINY = lo.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=0, rope_theta=10000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=True)


# ----------------------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe():
    """Tiny deterministic BPE: vocab = specials + 256 byte symbols + N_MERGES merges."""
    from tokenizers import pre_tokenizers
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    words = Counter(w for w, _ in pre.pre_tokenize_str(CORPUS))
    b2u = bytes_to_unicode()
    tokens = SPECIALS + [b2u[b] for b in range(256)]
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(N_MERGES):
        pairs = Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    types = [cg.TOKEN_TYPE_CONTROL] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": types, "merges": merges,
            "bos": 1, "eos": 2, "unk": 0, "pad": 2, "eot": None, "add_bos": False,
            "chat_template": SMOLLM2_CHAT_TEMPLATE}


# ----------------------------------------------------------------------------- weights
def random_weights(cfg: lo.LlamaConfig, rng):
    """HF-order f32 weights ([out, in]); special-token rows are small so greedy avoids eos."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def lin(n, k, gain=1.0):
        return (rng.standard_normal((n, k)) * gain / np.sqrt(k)).astype(np.float32)
    emb = rng.standard_normal((V, H)).astype(np.float32)
    emb[: len(SPECIALS)] *= 0.05
    W = {"model.embed_tokens.weight": emb,
         "model.norm.weight": (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        W[f"{p}.input_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        W[f"{p}.post_attention_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        W[f"{p}.self_attn.q_proj.weight"] = lin(nh * hd, H, 2.0)
        W[f"{p}.self_attn.k_proj.weight"] = lin(nkv * hd, H, 2.0)
        W[f"{p}.self_attn.v_proj.weight"] = lin(nkv * hd, H)
        W[f"{p}.self_attn.o_proj.weight"] = lin(H, nh * hd, 4.0)
        W[f"{p}.mlp.gate_proj.weight"] = lin(I, H, 2.0)
        W[f"{p}.mlp.up_proj.weight"] = lin(I, H, 2.0)
        W[f"{p}.mlp.down_proj.weight"] = lin(H, I, 4.0)
    return W


def permute_for_gguf(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's permute (HF rotate-half rows -> interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, cfg: lo.LlamaConfig, W, tok, arch="llama", types=None, name="emberd tiny q4",
                    rope_freqs=None, extra_strings=None):
    """A GGUF as llama.cpp's converter writes one: `types` maps a tensor kind (token_embd,
    output, attn_q, ..., ffn_down) to its type (default: Q8_0 embedding, Q4_1 linears);
    qwen2 keeps Q/K as trained and carries the q/k/v biases of W; `extra_strings` are further
    string metadata (key -> value)."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    import kquants
    types = {"token_embd": QT.Q8_0, **(types or {})}
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(name)
    wr.add_block_count(cfg.num_hidden_layers)
    wr.add_context_length(cfg.max_position_embeddings)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_attention_heads)
    wr.add_head_count_kv(cfg.num_key_value_heads)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_rope_dimension_count(cfg.head_dim)
    wr.add_vocab_size(cfg.vocab_size)
    wr.add_file_type(3)  # MOSTLY_Q4_1
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(tok["pre"])
    wr.add_token_list(tok["tokens"])
    wr.add_token_types(tok["types"])
    wr.add_token_merges(tok["merges"])
    wr.add_bos_token_id(tok["bos"])
    wr.add_eos_token_id(tok["eos"])
    wr.add_unk_token_id(tok["unk"])
    wr.add_pad_token_id(tok["pad"])
    wr.add_add_bos_token(False)
    wr.add_chat_template(tok["chat_template"])
    for key, value in (extra_strings or {}).items():
        wr.add_string(key, value)

    def q(name, arr, qt):
        arr = np.ascontiguousarray(arr, np.float32)
        blocks = (kquants.quantize(arr, qt.name) if qt.name in kquants.BYTES
                  else gguf.quants.quantize(arr, qt))
        wr.add_tensor(name, blocks, raw_dtype=qt)
    q("token_embd.weight", W["model.embed_tokens.weight"], types["token_embd"])
    if "lm_head.weight" in W:
        q("output.weight", W["lm_head.weight"], types.get("output", QT.Q8_0))
    if rope_freqs is not None:
        wr.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    wr.add_tensor("output_norm.weight", W["model.norm.weight"])
    m = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        wr.add_tensor(f"blk.{i}.attn_norm.weight", W[f"{p}.input_layernorm.weight"])
        wr.add_tensor(f"blk.{i}.ffn_norm.weight", W[f"{p}.post_attention_layernorm.weight"])
        for gn, hf in m.items():
            w = W[f"{p}.{hf}.weight"]
            if arch == "llama" and gn == "attn_q":
                w = permute_for_gguf(w, cfg.num_attention_heads)
            elif arch == "llama" and gn == "attn_k":
                w = permute_for_gguf(w, cfg.num_key_value_heads)
            q(f"blk.{i}.{gn}.weight", w, types.get(gn, QT.Q4_1))
            if f"{p}.{hf}.bias" in W:
                wr.add_tensor(f"blk.{i}.{gn}.bias", W[f"{p}.{hf}.bias"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ----------------------------------------------------------------------------- packages
def reference_cases(model_path: Path, cfg, tok):
    from tokenizers import Tokenizer
    pkg = model_path.parent if model_path.parent.name != "onnx" else model_path.parent.parent
    tk = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    chat = cg.render_chat(tok["chat_template"], [{"role": "user", "content": "Hello, how are you?"}], True)
    prompts = [(tk.encode(chat, add_special_tokens=False).ids, 8),
               (tk.encode("The quick brown fox 123", add_special_tokens=False).ids, 8),
               ([1], 12)]
    dec = cg.OrtDecoder(cg.ort_session(model_path), cfg)
    cases = []
    for ids, steps in prompts:
        gen, logits = dec.greedy(ids, steps)
        if any(t in cg.eos_ids(tok) for t in gen):
            raise SystemExit(f"tiny model greedy hit an eos id within {steps} steps: {gen}")
        srt = np.sort(np.stack(logits), axis=-1)
        cases.append({"prompt_ids": ids, "steps": steps, "greedy_ids": gen,
                      "min_top2_margin": round(float((srt[:, -1] - srt[:, -2]).min()), 4),
                      "step_logits": [[round(float(x), 6) for x in l] for l in logits]})
    return cases


def write_common(out: Path, cfg, tok, name, model_file, layout):
    cg.write_json(out / "tokenizer.json", cg.tokenizer_json(tok))
    cg.write_json(out / "tokenizer_config.json", cg.tokenizer_config(tok, cfg.max_position_embeddings))
    cg.write_json(out / "config.json", cg.config_json(cfg, tok))
    cg.write_json(out / "generation_config.json", cg.generation_config(tok))
    # genai_config.json is a genai export's manifest; a hub export (no model_file) has none
    if layout != "genai" and model_file is not None:
        cg.write_json(out / "emberd.json", {"format": cg.FORMAT, "name": name,
                                            "files": {"ort": model_file, "tract": model_file},
                                            "layout": layout})


def genai_config(cfg: lo.LlamaConfig, tok) -> dict:
    return {
        "model": {
            "bos_token_id": tok["bos"], "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": cg.eos_ids(tok) if len(cg.eos_ids(tok)) > 1 else tok["eos"],
            "pad_token_id": tok["pad"], "type": "llama", "vocab_size": cfg.vocab_size,
        },
        "search": {"do_sample": False, "max_length": cfg.max_position_embeddings, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def generate(out: Path, log=print):
    t0 = time.time()
    rng = np.random.default_rng(SEED)
    tok = train_bpe()
    cfg = dataclasses.replace(TINY, vocab_size=len(tok["tokens"]))
    W32 = random_weights(cfg, rng)
    Wf = {k: (lo.F32W(v) if v.ndim == 2 else v) for k, v in W32.items()}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = {}
    for name, layout, fname in (("optimum", "optimum", "model.onnx"),
                                ("optimum-merged", "merged", "decoder_model_merged.onnx"),
                                ("genai", "genai", "model.onnx")):
        d = out / name
        d.mkdir()
        opts = lo.BuildOptions(layout=layout, linear="f32", q8="f32", accuracy_level=0,
                               doc=f"emberd tiny test model ({layout}), random weights, seed {SEED}")
        lo.save_model(lo.build_model(cfg, Wf, opts), d / fname)
        write_common(d, cfg, tok, f"tiny-{name}", fname, layout)
        if layout == "genai":
            cg.write_json(d / "genai_config.json", genai_config(cfg, tok))
        cases = reference_cases(d / fname, cfg, tok)
        cg.write_json(d / "reference.json", {"model_file": fname, "layout": layout, "cases": cases})
        summary[name] = [c["greedy_ids"] for c in cases]

    # q4: through a tiny GGUF and the real converter
    summary["q4"] = gguf_package(out / "q4", "tiny-q4", cfg, W32, tok)

    # the k-quants (K dimensions of 256, a super-block) in the mixes llama.cpp's Q4_K_M and
    # Q5_K_M files have, on Llama 3 (rope_freqs) and on Qwen2 (q/k/v biases, NEOX rotary,
    # an untied Q4_K embedding beside a Q6_K output)
    from gguf import GGMLQuantizationType as QT
    kcfg = dataclasses.replace(cfg, hidden_size=256, head_dim=64, intermediate_size=512)
    rng = np.random.default_rng(SEED + 1)
    W = random_weights(kcfg, rng)
    W["model.norm.weight"] *= 0.3   # logits of the q4 model's spread (a tied embedding of 256)
    factors = np.linspace(1.0, 8.0, kcfg.head_dim // 2).astype(np.float32)  # what llama3 scaling makes
    # (and the 5-bit fallbacks llama.cpp takes for rows that are no whole super-blocks)
    q4_k_m = {"token_embd": QT.Q6_K, "attn_v": QT.Q6_K, "ffn_down": QT.Q6_K, "attn_output": QT.Q5_0,
              **{k: QT.Q4_K for k in ("attn_q", "attn_k", "ffn_gate", "ffn_up")}}
    summary["kq-llama3"] = gguf_package(out / "kq-llama3", "tiny-kq-llama3",
                                        dataclasses.replace(kcfg, rope_theta=500000.0), W,
                                        {**tok, "pre": "llama-bpe"}, types=q4_k_m, rope_freqs=factors)
    Wq = dict(random_weights(kcfg, rng))
    Wq["lm_head.weight"] = (4.0 * rng.standard_normal((kcfg.vocab_size, kcfg.hidden_size)) /
                            np.sqrt(kcfg.hidden_size)).astype(np.float32)
    Wq["lm_head.weight"][: len(SPECIALS)] *= 0.05
    for i in range(kcfg.num_hidden_layers):
        for x, n in (("q", kcfg.num_attention_heads), ("k", kcfg.num_key_value_heads), ("v", kcfg.num_key_value_heads)):
            Wq[f"model.layers.{i}.self_attn.{x}_proj.bias"] = (0.5 * rng.standard_normal(n * kcfg.head_dim)).astype(np.float32)
    q5_k_m = {"token_embd": QT.Q4_K, "output": QT.Q6_K, "attn_v": QT.Q6_K, "ffn_down": QT.Q6_K,
              "ffn_up": QT.Q5_1, **{k: QT.Q5_K for k in ("attn_q", "attn_k", "attn_output", "ffn_gate")}}
    summary["kq-qwen2"] = gguf_package(out / "kq-qwen2", "tiny-kq-qwen2",
                                       dataclasses.replace(kcfg, rope_theta=1000000.0, tie_word_embeddings=False),
                                       Wq, {**tok, "pre": "qwen2"}, arch="qwen2", types=q5_k_m)
    summary["q4f16"] = half_precision_export(out / "q4f16", out / "q4", cfg, tok)
    log(f"[test models] {', '.join(summary)} in {out} ({time.time() - t0:.1f} s, vocab {cfg.vocab_size})")
    return summary


def gguf_package(d: Path, name, cfg, W32, tok, **gguf_args):
    """A package through a tiny GGUF (kept as source.gguf) and the real converter, with
    reference cases from its ONNX Runtime graph and `step_logits_exact` from the same weights
    at accuracy_level 0 (what tract computes); returns the cases' greedy ids."""
    d.mkdir()
    write_tiny_gguf(d / "source.gguf", cfg, W32, tok, name="emberd " + name.replace("-", " ", 1), **gguf_args)
    cg.convert(d / "source.gguf", d, name=name, reference=False, log=lambda *_: None)
    manifest = json.loads((d / "emberd.json").read_text())
    manifest["layout"] = "optimum"
    cg.write_json(d / "emberd.json", manifest)
    ort_file = manifest["files"]["ort"]    # model.ort.onnx: the GroupQueryAttention graph
    cases = reference_cases(d / ort_file, cfg, tok)
    # the tract form without activation quantization: what tract computes
    cfg_q, Wq, _, _ = cg.read_gguf(d / "source.gguf")
    exact = d / "exact.tmp.onnx"
    lo.save_model(lo.build_model(cfg_q, Wq, cg.tract_options(lo.BuildOptions(accuracy_level=0))), exact)
    dec = cg.OrtDecoder(cg.ort_session(exact), cfg)
    for c in cases:
        # its own greedy path: where int8 activations tip a close argmax the paths part
        gen, ex = dec.greedy(c["prompt_ids"], c["steps"])
        srt = np.sort(np.stack(ex), axis=-1)
        c["greedy_ids_exact"] = gen
        c["min_top2_margin_exact"] = round(float((srt[:, -1] - srt[:, -2]).min()), 4)
        c["step_logits_exact"] = [[round(float(x), 6) for x in l] for l in ex]
    exact.unlink()
    cg.write_json(d / "reference.json", {"model_file": ort_file, "layout": "optimum", "cases": cases,
                                         "note": "greedy_ids, step_logits: onnxruntime, MatMulNBits "
                                                 "accuracy_level 4 (int8 activations); greedy_ids_exact, "
                                                 "step_logits_exact: the same weights in tract's form "
                                                 "(model.tract.onnx where there is one), accuracy_level "
                                                 "0: what tract computes"})
    return [c["greedy_ids"] for c in cases]


def half_precision_export(d: Path, q4: Path, cfg, tok):
    """A hub-style export whose whole graph runs in f16, KV cache and logits included, as
    transformers.js's `onnx/model_q4f16.onnx` files do: the q4 package's ONNX Runtime graph (at
    accuracy_level 0) through ONNX Runtime's own float16 converter, alone in `onnx/` beside the
    tokenizer and config files (no emberd.json), with references from onnxruntime on it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    cfg_q, Wq, _, _ = cg.read_gguf(q4 / "source.gguf")
    graph = lo.build_model(cfg_q, Wq, cg.ort_options(lo.BuildOptions(accuracy_level=0, last_logits=True)))
    (d / "onnx").mkdir(parents=True)
    f16 = convert_float_to_float16(graph, keep_io_types=False, disable_shape_infer=True)
    lo.save_model(f16, d / "onnx" / "model_q4f16.onnx")
    write_common(d, cfg, tok, "tiny-q4f16", None, "optimum")
    cases = reference_cases(d / "onnx" / "model_q4f16.onnx", cfg, tok)
    cg.write_json(d / "reference.json", {"model_file": "onnx/model_q4f16.onnx", "layout": "optimum",
                                         "cases": cases, "note": "onnxruntime on the f16 graph"})
    return [c["greedy_ids"] for c in cases]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "test" / "generated"))
    a = ap.parse_args()
    generate(Path(a.out))


if __name__ == "__main__":
    main()
