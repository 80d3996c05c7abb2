#!/usr/bin/env python3
"""llama.cpp's side of bench/compare.sh: the same measurements as `emberd bench` (load,
128-token prefill, TTFT, greedy decode of 64 tokens, medians over --runs after a warm-up),
on the same weights as GGUF, through llama-cpp-python's low-level eval (llama_decode; greedy
argmax over the last logits). Prints one JSON object.

    bench/.venv-llama/bin/python bench/llama_cpp_bench.py --gguf FILE --threads 2
"""
import argparse
import json
import resource
import time

import numpy as np
from greedy_timing import time_greedy
from llama_cpp import Llama


def rss_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode-at", default="", help="also decode speed after prompts of these lengths, e.g. 100,2000")
    args = ap.parse_args()

    # What the interpreter and the library take before any model: not llama.cpp's cost.
    base_rss = rss_mib("VmRSS")
    t0 = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=args.context, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, n_ubatch=512, verbose=False)
    load_ms = (time.perf_counter() - t0) * 1e3
    # The same kind of prompt as `emberd bench`: ordinary text, cut to exactly N tokens.
    text = "The quick brown fox jumps over the lazy dog while the sensor reports a steady temperature. "

    def prompt_of(n):
        return llm.tokenize((text * (n // 8 + 4)).encode(), add_bos=False)[:n]

    prompt = prompt_of(args.prompt_tokens)

    n_vocab = llm.n_vocab()

    def next_token():
        # llama.cpp's logits of the last evaluated position (llm.scores is only filled with
        # logits_all=True, which would compute the logits of every prompt position)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def reset():
        llm.reset()
        llm._ctx.kv_cache_clear()

    def prefill():
        llm.eval(prompt)
        return next_token()

    def step(token):
        llm.eval([token])
        return next_token()

    figures = time_greedy(reset, prefill, step, args.prompt_tokens, args.gen_tokens, args.runs)
    by_position = []
    for n in [int(x) for x in args.decode_at.split(",") if x]:
        # as `emberd bench --decode-at`: 32 greedy tokens after an n-token prompt, median of 3
        speeds = []
        for _ in range(3):
            reset()
            llm.eval(prompt_of(n))
            token = next_token()
            t0 = time.perf_counter()
            for _ in range(32):
                token = step(token)
            speeds.append(32 / (time.perf_counter() - t0))
        by_position.append({"position": n, "decode_tokens_per_s": {
            "min": min(speeds), "median": float(np.median(speeds)), "max": max(speeds)}})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "engine": "llama.cpp", "threads": args.threads, "context": args.context,
        "load_ms": load_ms, **figures, "decode_by_position": by_position,
        "peak_rss_mb": peak, "peak_rss_mb_without_python": peak - base_rss,
    }))

if __name__ == "__main__":
    main()
