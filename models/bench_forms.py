#!/usr/bin/env python3
"""Measure the candidate weight forms of a converted GGUF: decode tokens/s, prefill time,
peak RSS, file size, and max |logit - numpy reference| over a 35-token chat prompt.

    .venv/bin/python models/bench_forms.py --gguf X.gguf [--forms a,b] [--tract] [--json out.json]

ONNX Runtime (Python, CPU EP, intra-op threads = --threads) always; tract too with --tract when
the `tract` Python package (same version as the Rust crate) is installed. Each engine/form
runs in a fresh subprocess so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FORMS = {
    # name: BuildOptions kwargs
    "q4-acc4+head-split4": dict(linear="nbits", q8="split4", accuracy_level=4),
    "q4-acc4+head-nbits8": dict(linear="nbits", q8="nbits8", accuracy_level=4),
    "q4-acc4+head-f32": dict(linear="nbits", q8="f32", accuracy_level=4),
    "q4-acc0+head-split4": dict(linear="nbits", q8="split4", accuracy_level=0),
    "q4-acc4-unfused+head-split4": dict(linear="nbits", q8="split4", accuracy_level=4, fuse=False),
    "f32": dict(linear="f32", q8="f32", accuracy_level=0),
}
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint, "
                                      "and what colours it likes best."}]


def peak_rss_mb():
    """VmHWM of this process (ru_maxrss would include the parent's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def child(engine, path, prompt_ids, n_decode, threads, cfg_json):
    """Runs in a subprocess: load, prefill, decode; prints one JSON line."""
    import llama_onnx as lo
    cfg = lo.LlamaConfig(**json.loads(cfg_json))
    L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    ids = np.asarray(prompt_ids, np.int64)[None]
    t0 = time.perf_counter()
    if engine == "ort":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def run(feed):
            return sess.run(None, feed)
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        import tract
        im = tract.onnx().load(path)
        names = [im.input_name(i) for i in range(im.input_count())]
        for i, n in enumerate(names):
            if n in ("input_ids", "position_ids"):
                im.set_input_fact(i, "1,S,i64")
            elif n == "attention_mask":
                im.set_input_fact(i, "1,P+S,i64")
            elif n.startswith("past_key_values"):
                im.set_input_fact(i, f"1,{nkv},P,{hd},f32")
        rn = im.into_model().into_runnable()

        def run(feed):
            return [o.to_numpy() for o in rn.run([feed[n] for n in names])]
    load_s = time.perf_counter() - t0

    def feed(x, past):
        P, S = past[0][0].shape[2], x.shape[1]
        f = {"input_ids": x, "attention_mask": np.ones((1, P + S), np.int64),
             "position_ids": np.arange(P, P + S, dtype=np.int64)[None]}
        for i, (k, v) in enumerate(past):
            f[f"past_key_values.{i}.key"], f[f"past_key_values.{i}.value"] = k, v
        return f
    z = np.zeros((1, nkv, 0, hd), np.float32)
    past = [(z, z)] * L
    t0 = time.perf_counter()
    out = run(feed(ids, past))
    prefill_s = time.perf_counter() - t0
    logits = out[0][0]
    past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(L)]
    tok = int(logits[-1].argmax())
    gen = [tok]
    t0 = time.perf_counter()
    for _ in range(n_decode):
        out = run(feed(np.array([[tok]], np.int64), past))
        past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(L)]
        tok = int(out[0][0, -1].argmax())
        gen.append(tok)
    dec_s = time.perf_counter() - t0
    np.save(os.environ["BENCH_LOGITS_OUT"], logits)
    print(json.dumps({"load_s": round(load_s, 2), "prefill_ms": round(prefill_s * 1e3, 1),
                      "decode_tokens_per_s": round(n_decode / dec_s, 1),
                      "peak_rss_mb": peak_rss_mb(),
                      "greedy": gen}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="repeat, interleaved; keep each form's best")
    ap.add_argument("--tract", action="store_true", help="also run tract (needs the `tract` package)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        engine, path, ids, n, cfgj = a.child
        child(engine, path, json.loads(ids), int(n), a.threads, cfgj)
        return
    import dataclasses

    import convert_gguf as cg
    import llama_onnx as lo
    import reference_numpy as rn
    from tokenizers import Tokenizer
    cfg, W, tok, _ = cg.read_gguf(a.gguf)
    tmp = Path(tempfile.mkdtemp(prefix="emberd-bench-"))
    tj = cg.tokenizer_json(tok)
    (tmp / "tokenizer.json").write_text(json.dumps(tj))
    text = cg.render_chat(tok["chat_template"], PROMPT, True)
    ids = Tokenizer.from_file(str(tmp / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    print(f"prompt: {len(ids)} tokens; numpy reference forward...", flush=True)
    ref = rn.GGUFLlama(a.gguf).forward(ids)
    forms = a.forms.split(",")
    paths, build_s = {}, {}
    for form in forms:
        paths[form] = tmp / f"{form}.onnx"
        t0 = time.perf_counter()
        lo.save_model(lo.build_model(cfg, W, lo.BuildOptions(**FORMS[form])), paths[form])
        build_s[form] = round(time.perf_counter() - t0, 1)
    results = {}
    # rounds interleave the forms; the best round of each is kept (other load only slows down)
    for rnd in range(a.rounds):
        for form in forms:
            for engine in (["ort", "tract"] if a.tract else ["ort"]):
                key = f"{engine}:{form}"
                if "error" in results.get(key, {}):
                    continue
                env = dict(os.environ, BENCH_LOGITS_OUT=str(tmp / "logits.npy"))
                p = subprocess.run([sys.executable, __file__, "--gguf", a.gguf, "--threads", str(a.threads),
                                    "--child", engine, str(paths[form]), json.dumps(ids), str(a.decode),
                                    json.dumps(dataclasses.asdict(cfg))], capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    err = [l for l in p.stderr.splitlines() if "Error" in l or "error" in l]
                    results[key] = {"error": (err or p.stderr.strip().splitlines() or ["?"])[-1][:200]}
                    print(f"{engine:5s} {form:30s} ERROR {results[key]['error']}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.pop("greedy", None)
                lg = np.load(tmp / "logits.npy")
                r["max_abs_dlogit_vs_numpy"] = float(f"{np.abs(lg - ref).max():.3g}")
                r["mean_abs_dlogit_vs_numpy"] = float(f"{np.abs(lg - ref).mean():.3g}")
                r["argmax_agree"] = f"{int((lg.argmax(-1) == ref.argmax(-1)).sum())}/{len(ids)}"
                r.update(file_mb=round(paths[form].stat().st_size / 1e6, 1), build_s=build_s[form])
                old = results.get(key)
                if old is not None:
                    r["decode_tokens_per_s"] = max(r["decode_tokens_per_s"], old["decode_tokens_per_s"])
                    r["prefill_ms"] = min(r["prefill_ms"], old["prefill_ms"])
                    r["load_s"] = min(r["load_s"], old["load_s"])
                    r["peak_rss_mb"] = min(r["peak_rss_mb"], old["peak_rss_mb"])
                results[key] = r
                print(f"[round {rnd + 1}] {engine:5s} {form:28s} {json.dumps(r)}", flush=True)
    print("\nbest of rounds:")
    for k, r in results.items():
        print(f"{k:40s} {json.dumps(r)}")
    for pth in paths.values():
        pth.unlink()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
