#!/usr/bin/env python3
"""The baseline for `emberd bench`: a plain onnxruntime Python greedy loop on the same model
file, prompt length, generation length and thread count. Prints one JSON object with the
same keys as `emberd bench` (medians over --runs).

    .venv/bin/python bench/ort_python_greedy.py --model models/smollm2-135m-instruct \
        --prompt-tokens 128 --gen-tokens 64 --runs 5 --threads 2
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from greedy_timing import time_greedy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    pkg = Path(args.model)
    manifest = json.loads((pkg / "emberd.json").read_text())
    cfg = json.loads((pkg / "config.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(pkg / manifest["files"]["ort"]), opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    layers, kv, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    # Ordinary token ids (not special tokens), the same shape of prompt as emberd's bench.
    prompt = (np.arange(args.prompt_tokens, dtype=np.int64) * 7919) % 40000 + 100

    def run(ids, past, start):
        n = len(ids)
        feed = {
            "input_ids": ids[None, :],
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :],
        }
        for i in range(layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = sess.run(None, feed)
        return int(np.argmax(out[0][0, -1])), out[1:]

    # The cache between calls: past tensors and the next position.
    state = {}

    def reset():
        state["past"] = [np.zeros((1, kv, 0, hd), dtype=np.float32) for _ in range(2 * layers)]
        state["pos"] = 0

    def feed(ids):
        token, state["past"] = run(ids, state["past"], state["pos"])
        state["pos"] += len(ids)
        return token

    figures = time_greedy(reset, lambda: feed(prompt), lambda t: feed(np.array([t], dtype=np.int64)),
                          args.prompt_tokens, args.gen_tokens, args.runs)
    print(json.dumps({
        "engine": "onnxruntime-python", "threads": args.threads, "load_ms": load_ms, **figures,
    }))

if __name__ == "__main__":
    main()
