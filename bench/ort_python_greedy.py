#!/usr/bin/env python3
"""The baseline for `emberd bench`: a plain onnxruntime Python greedy loop on the same model
file, prompt length, generation length and thread count. Prints one JSON object with the
same keys as `emberd bench` (medians over --runs).

    .venv/bin/python bench/ort_python_greedy.py --model models/smollm2-135m-instruct \
        --prompt-tokens 128 --gen-tokens 64 --runs 5 --threads 2

Also for comparing graphs and session settings: --file picks another ONNX file of the package
(default: the manifest's files.ort), --decode-at 100,2000 adds decode tokens/s of 32 tokens
after prompts of those lengths, --opt-level/--no-arena/--config KEY=VALUE set session options
(e.g. --config session.intra_op.allow_spinning=0), --share-buffer runs the KV cache in fixed
buffers bound as both past and present (GroupQueryAttention graphs only), and peak_rss_mb is
this process's high-water mark (run one configuration per process).
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

OPT_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def rss_mb(field="VmHWM"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--file", help="ONNX file in the package (default: the manifest's files.ort)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-at", default="", help="comma-separated context positions, e.g. 100,2000")
    ap.add_argument("--opt-level", default="all", choices=sorted(OPT_LEVELS))
    ap.add_argument("--no-arena", action="store_true", help="enable_cpu_mem_arena = False")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="session config entry (repeatable)")
    ap.add_argument("--share-buffer", type=int, default=0, metavar="MAX_LEN",
                    help="KV cache in [1, kv, MAX_LEN, hd] buffers bound as past and present")
    args = ap.parse_args()

    pkg = Path(args.model)
    manifest = json.loads((pkg / "emberd.json").read_text())
    cfg = json.loads((pkg / "config.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.graph_optimization_level = OPT_LEVELS[args.opt_level]
    opts.enable_cpu_mem_arena = not args.no_arena
    for kv in args.config:
        k, v = kv.split("=", 1)
        opts.add_session_config_entry(k, v)
    model_file = args.file or manifest["files"]["ort"]
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(pkg / model_file), opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_after_load = rss_mb("VmRSS")
    layers, kv, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]

    def step(ids, past, start):
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
        return out[0][0, -1], out[1:]

    if args.share_buffer:
        # past and present are one buffer per tensor: GroupQueryAttention appends in place
        bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv, args.share_buffer, hd), np.float32))
                for _ in range(2 * layers)]
        binding = sess.io_binding()

        def step(ids, past, start):  # noqa: F811 (past is the buffers, kept across calls)
            n = len(ids)
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids[None, :]))
            binding.bind_cpu_input("attention_mask", np.ones((1, start + n), dtype=np.int64))
            binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None, :])
            binding.bind_output("logits")
            for i in range(layers):
                for j, kind in enumerate(("key", "value")):
                    binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", bufs[2 * i + j])
                    binding.bind_ortvalue_output(f"present.{i}.{kind}", bufs[2 * i + j])
            sess.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()[0, -1], past

    def empty_past():
        return [np.zeros((1, kv, 0, hd), dtype=np.float32) for _ in range(2 * layers)]

    def prompt_of(n):
        # Ordinary token ids (not special tokens), the same shape of prompt as emberd's bench.
        return (np.arange(n, dtype=np.int64) * 7919) % 40000 + 100

    def generate(prompt, gen):
        """(prefill seconds, decode tokens/s of gen - 1 steps)."""
        t0 = time.perf_counter()
        logits, past = step(prompt, empty_past(), 0)
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        pos = len(prompt)
        for _ in range(gen - 1):
            logits, past = step(np.array([token], dtype=np.int64), past, pos)
            pos += 1
            token = int(np.argmax(logits))
        return t1 - t0, (gen - 1) / (time.perf_counter() - t1)

    prefill, decode = [], []
    prompt = prompt_of(args.prompt_tokens)
    for run in range(args.runs + 1):
        p, d = generate(prompt, args.gen_tokens)
        if run == 0:
            continue  # warm-up
        prefill.append(p * 1e3)
        decode.append(d)
    med = statistics.median
    result = {
        "engine": "onnxruntime-python", "file": model_file, "threads": args.threads, "load_ms": load_ms,
        "prefill_ms": med(prefill), "prefill_tokens_per_s": args.prompt_tokens / (med(prefill) / 1e3),
        "ttft_ms": med(prefill), "decode_tokens_per_s": med(decode),
        "decode_tokens_per_s_min": min(decode), "decode_tokens_per_s_max": max(decode),
    }
    positions = [int(x) for x in args.decode_at.split(",") if x]
    if positions:
        result["decode_by_position"] = [
            {"position": n, "decode_tokens_per_s": med([generate(prompt_of(n), 33)[1]
                                                        for _ in range(max(1, args.runs // 2))])}
            for n in positions]
    result.update(rss_after_load_mb=rss_after_load, peak_rss_mb=rss_mb())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
