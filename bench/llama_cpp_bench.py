#!/usr/bin/env python3
"""llama.cpp's side of bench/compare.sh, through its own C++ tools (bench/llama_cpp_tools.sh
builds them): the same figures as `emberd bench`, as llama.cpp is really used.

* llama-server (127.0.0.1, -c CONTEXT, -t THREADS): load ms (start to /health ready), then per
  run a 128-token prompt (token ids, no prompt cache) with 64 greedy tokens, eos ignored:
  prefill and decode tokens/s from the server's own timings; TTFT as a client sees it (the
  same prompt, one token, wall time); peak RSS of the server process (VmHWM).
* llama-bench: its own pp/tg figures (prompt of N; 64 tokens after a prompt of N, `-d`), for
  reference next to the server's.

Prints one JSON object. Standard library only.

    python3 bench/llama_cpp_bench.py --tools bench/.llama-cpp/bin --gguf FILE --threads 2
"""
import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

TEXT = "The quick brown fox jumps over the lazy dog while the sensor reports a steady temperature. "


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def vm(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def spread(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def server_figures(args):
    port = free_port()
    cmd = [str(args.tools / "llama-server"), "-m", args.gguf, "-t", str(args.threads), "-tb", str(args.threads),
           "-c", str(args.context), "-b", "512", "-ub", "512", "--host", "127.0.0.1", "--port", str(port),
           "-np", "1", "--no-webui"]
    # Its log goes to a file: a pipe nobody reads would fill and stall the server.
    log = tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"llama-server exited {proc.returncode}: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.01)
        load_ms = (time.perf_counter() - t0) * 1e3

        def prompt_of(n):
            ids = post(port, "/tokenize", {"content": TEXT * (n // 8 + 4), "add_special": False})["tokens"]
            return ids[:n]

        def complete(prompt, n_predict):
            return post(port, "/completion", {
                "prompt": prompt, "n_predict": n_predict, "cache_prompt": False, "ignore_eos": True,
                "temperature": 0, "top_k": 1, "samplers": ["top_k"], "stream": False})

        prompt = prompt_of(args.prompt_tokens)
        complete(prompt, 4)  # warm-up
        prefill, decode, ttft = [], [], []
        for _ in range(args.runs):
            t = complete(prompt, args.gen_tokens)["timings"]
            prefill.append(t["prompt_per_second"])
            decode.append(t["predicted_per_second"])
            t0 = time.perf_counter()
            complete(prompt, 1)
            ttft.append((time.perf_counter() - t0) * 1e3)
        by_position = []
        for n in args.decode_at:
            # as `emberd bench --decode-at`: 32 greedy tokens after an n-token prompt
            p = prompt_of(n)
            speeds = [complete(p, 32)["timings"]["predicted_per_second"] for _ in range(3)]
            by_position.append({"position": n, "decode_tokens_per_s": spread(speeds)})
        peak = vm(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait()
    return {"load_ms": load_ms, "prefill_tokens_per_s": statistics.median(prefill),
            "decode_tokens_per_s": statistics.median(decode), "ttft_ms": statistics.median(ttft),
            "peak_rss_mb": peak, "decode_by_position": by_position}


def bench_figures(args):
    """llama-bench's own: pp (prompt of N) and tg (gen tokens after a prompt of N: -d)."""
    out = subprocess.run(
        [str(args.tools / "llama-bench"), "-m", args.gguf, "-t", str(args.threads), "-r", str(args.runs),
         "-p", str(args.prompt_tokens), "-n", "0", "-o", "json"], check=True, capture_output=True, text=True)
    pp = json.loads(out.stdout)[0]["avg_ts"]
    out = subprocess.run(
        [str(args.tools / "llama-bench"), "-m", args.gguf, "-t", str(args.threads), "-r", str(args.runs),
         "-p", "0", "-n", str(args.gen_tokens), "-d", str(args.prompt_tokens), "-o", "json"],
        check=True, capture_output=True, text=True)
    tg = json.loads(out.stdout)[0]["avg_ts"]
    return {"llama_bench_prefill_tokens_per_s": pp, "llama_bench_decode_tokens_per_s": tg}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", type=Path, required=True, help="folder with llama-server and llama-bench")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode-at", default="", help="also decode speed after prompts of these lengths, e.g. 100,2000")
    ap.add_argument("--no-llama-bench", action="store_true")
    args = ap.parse_args()
    args.decode_at = [int(x) for x in args.decode_at.split(",") if x]
    figures = {"engine": "llama.cpp (llama-server)", "threads": args.threads, "context": args.context,
               **server_figures(args)}
    if not args.no_llama_bench:
        figures.update(bench_figures(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
