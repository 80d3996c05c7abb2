"""HTTP client figures for bench/transports.sh, on a plain socket (no client library, whose
own per-chunk cost would be measured too).

    python3 bench/http_client.py stream HOST:PORT PROMPT MAX_TOKENS   # one streamed request
    python3 bench/http_client.py busy HOST:PORT N                     # N requests, each answered 503

stream prints {"decode_tokens_per_s", "ttft_ms", "tokens"} as the client saw them: decode
speed from the first content chunk to the last. busy prints the latency of each answer.
"""
import json
import socket
import sys
import time


def post(addr, path, body):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n"
              f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode() + data)
    return s


def stream(addr, prompt, max_tokens):
    sent = time.perf_counter()
    s = post(addr, "/v1/completions", {"prompt": prompt, "max_tokens": int(max_tokens),
                                       "temperature": 0, "stream": True})
    f = s.makefile("rb")
    stamps = []
    for line in f:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk["choices"] and chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    s.close()
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    print(json.dumps({"decode_tokens_per_s": decode, "ttft_ms": (stamps[0] - sent) * 1e3,
                      "tokens": len(stamps)}))


def busy(addr, n):
    latencies = []
    for _ in range(int(n)):
        t0 = time.perf_counter()
        s = post(addr, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        status = s.makefile("rb").readline().split()[1]
        latencies.append((time.perf_counter() - t0) * 1e3)
        s.close()
        if status != b"503":
            sys.exit(f"expected 503 (queue full), got {status!r}")
    print(json.dumps({"busy_ms": latencies}))


{"stream": stream, "busy": busy}[sys.argv[1]](*sys.argv[2:])
