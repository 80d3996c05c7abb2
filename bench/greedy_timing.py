"""The timing loop both Python baselines share (bench/ort_python_greedy.py,
bench/llama_cpp_bench.py): one warm-up round, then `runs` rounds of a prefill and greedy
steps; medians in the keys `emberd bench` prints."""
import statistics
import time


def time_greedy(reset, prefill, step, prompt_tokens, gen_tokens, runs):
    """reset() empties the cache, prefill() returns the first token, step(token) the next."""
    prefill_ms, decode = [], []
    for run in range(runs + 1):
        reset()
        t0 = time.perf_counter()
        token = prefill()
        t1 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            token = step(token)
        t2 = time.perf_counter()
        if run == 0:
            continue  # warm-up
        prefill_ms.append((t1 - t0) * 1e3)
        decode.append((gen_tokens - 1) / (t2 - t1))
    med = statistics.median(prefill_ms)
    return {
        "prefill_ms": med, "prefill_tokens_per_s": prompt_tokens / (med / 1e3),
        # The first token comes out of the prefill.
        "ttft_ms": med, "decode_tokens_per_s": statistics.median(decode),
        "decode_tokens_per_s_min": min(decode), "decode_tokens_per_s_max": max(decode),
    }
