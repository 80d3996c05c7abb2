"""Soak: mixed load on a built emberd for N minutes, sampling its RSS, file descriptors and
threads. Not part of the test command; run it with bench/soak.sh.

Load (each worker picks one at random, again and again): streamed requests on the Unix
socket, requests cancelled after their first token, clients that hang up mid-stream, bad
input (not JSON, wrong types, an oversize line), OpenAI requests over HTTP (streamed, whole,
malformed), and MQTT requests (MQTT v5, Response Topic). Every few minutes the broker is
killed (SIGKILL) and restarted. Every request a client waits for must end with exactly one
terminal event; MQTT requests sent around a broker restart may be lost with the broker (it
keeps nothing) and are counted apart.

Prints the samples (start, middle, end), the RSS drift after warm-up (median of the first
five samples after it against the last five), and the count of each action; exits 1 on a
broken promise (a request without exactly one terminal event, an unexpected error) or a
drift beyond --max-drift percent.
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto that keeps nothing, on a port of its own."""

    def __init__(self, work):
        self.port = free_port()
        self.conf = os.path.join(work, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n")
        self.log = open(os.path.join(work, "mosquitto.log"), "ab")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["mosquitto", "-c", self.conf], stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("mosquitto did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait()


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.broken = []

    def add(self, what):
        with self.lock:
            self.counts[what] += 1

    def fail(self, what):
        with self.lock:
            self.broken.append(what)
            print(f"[soak] BROKEN: {what}", file=sys.stderr, flush=True)


def sock_events(conn, buf):
    """Yields wire events from a socket connection, line by line."""
    while True:
        while b"\n" not in buf[0]:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf[0] += chunk
        line, buf[0] = buf[0].split(b"\n", 1)
        yield json.loads(line)


def until_end(events, rid, tally, first=None):
    """Reads one request's events up to its terminal event; checks there is exactly one."""
    seen = [first] if first is not None else []
    for event in events:
        if event.get("id") != rid:
            continue
        seen.append(event)
        if event["type"] != "token":
            return event
    tally.fail(f"{rid}: the connection ended without a terminal event ({len(seen)} events)")
    return None


def socket_action(path, kind, tally, n):
    rid = f"{kind}-{n}"
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(120)
    conn.connect(path)
    buf = [b""]
    events = sock_events(conn, buf)
    try:
        if kind == "bad":
            bad = random.choice([b"not json\n", b'{"prompt": 5}\n', b'{"prompt":"x","max_tokens":-1}\n', b"x" * 70000 + b"\n"])
            conn.sendall(bad)
            event = next(events)
            if event["type"] != "error" or event["code"] not in ("bad_request", "too_long"):
                tally.fail(f"bad input answered {event}")
            # The connection stays usable.
            conn.sendall(json.dumps({"id": rid, "prompt": "ok", "max_tokens": 2}).encode() + b"\n")
            end = until_end(events, rid, tally)
        else:
            long = kind in ("cancel", "hangup")
            request = {"id": rid, "prompt": random.choice(["Tell me about rivers.", "Hi", "List three colours."]),
                       "max_tokens": 200 if long else random.randint(4, 48), "ignore_eos": long}
            conn.sendall(json.dumps(request).encode() + b"\n")
            first = next(events)
            if kind == "hangup":
                tally.add("socket hangup")
                return
            if kind == "cancel" and first["type"] == "token":
                conn.sendall(json.dumps({"type": "cancel", "id": rid}).encode() + b"\n")
            end = first if first["type"] != "token" else until_end(events, rid, tally, first)
        if end is None:
            return
        if end["type"] == "error" and end["code"] != "busy":
            tally.fail(f"{rid} ended with {end}")
        # Nothing after the terminal event.
        conn.settimeout(0.05)
        try:
            extra = conn.recv(1)
            if extra:
                tally.fail(f"{rid}: bytes after its terminal event")
        except socket.timeout:
            pass
        tally.add(f"socket {kind} {end['type'] if end['type'] == 'done' else end['code']}")
    finally:
        conn.close()


def http_action(port, model, tally):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    choice = random.random()
    try:
        if choice < 0.15:
            conn.request("POST", "/v1/chat/completions", body=b'{"messages": 7}', headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            tally.add(f"http bad {r.status}")
            if r.status != 400:
                tally.fail(f"a malformed body answered {r.status}")
            return
        stream = choice < 0.6
        body = {"model": model, "stream": stream, "max_tokens": random.randint(4, 40),
                "messages": [{"role": "user", "content": "Name a bird."}]}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read().decode()
        if r.status == 503:
            tally.add("http busy")
            return
        if r.status != 200:
            tally.fail(f"http answered {r.status}: {data[:200]}")
            return
        if stream:
            finals = [l for l in data.splitlines() if l.startswith("data: {") and '"finish_reason":"' in l.replace(" ", "")]
            if len(finals) != 1 or not data.rstrip().endswith("data: [DONE]"):
                tally.fail(f"a stream with {len(finals)} final chunks")
        tally.add(f"http {'stream' if stream else 'whole'} ok")
    finally:
        conn.close()


class MqttCaller:
    """One MQTT v5 client sending requests with a Response Topic and reading their events."""

    def __init__(self, port, device, name):
        self.device = device
        self.topic = f"soak/{name}"
        self.events = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.on_message = self.on_message
        self.client.on_connect = lambda c, *_: c.subscribe(self.topic, qos=1)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def on_message(self, _c, _u, msg):
        event = json.loads(msg.payload)
        with self.cond:
            self.events.setdefault(event["id"], []).append(event)
            self.cond.notify_all()

    def call(self, rid, tally, restarts):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        request = {"id": rid, "prompt": "Say hello.", "max_tokens": random.randint(4, 32)}
        epoch = restarts[0]
        sent_at = time.time()
        self.client.publish(f"emberd/{self.device}/request", json.dumps(request), qos=1, properties=props)
        deadline = time.time() + 60
        with self.cond:
            while time.time() < deadline:
                events = self.events.get(rid, [])
                terminals = [e for e in events if e["type"] != "token"]
                if terminals:
                    break
                self.cond.wait(0.5)
            events = self.events.pop(rid, [])
        terminals = [e for e in events if e["type"] != "token"]
        if not terminals:
            # Lost with a broker killed meanwhile, or sent while it was back but had not yet
            # got emberd's subscription again (it kept no session): the broker's loss.
            if restarts[0] != epoch or sent_at - restarts[1] < 20:
                tally.add("mqtt lost in a broker restart")
            else:
                tally.fail(f"mqtt {rid}: no terminal event in 60 s")
            return
        time.sleep(0.05)
        with self.cond:
            late = self.events.pop(rid, [])
        if len(terminals) + len([e for e in late if e["type"] != "token"]) != 1:
            # QoS 1 may deliver a message twice; the same seq twice is a duplicate, not two ends.
            seqs = {e["seq"] for e in terminals + late if e["type"] != "token"}
            if len(seqs) != 1:
                tally.fail(f"mqtt {rid}: {len(seqs)} different terminal events")
        end = terminals[0]
        if end["type"] == "error" and end["code"] != "busy":
            tally.fail(f"mqtt {rid} ended with {end}")
        tally.add(f"mqtt {end['type'] if end['type'] == 'done' else end['code']}")


def emberd_pid(pid):
    """The emberd process: `pid` itself, or under a --wrap command the first descendant
    named emberd."""
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            if open(f"/proc/{p}/comm").read().strip() == "emberd":
                return p
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass
    raise SystemExit(f"no emberd process under pid {pid}")


def proc_figures(pid):
    status = open(f"/proc/{pid}/status").read()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024
    threads = int(fields["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_mib, fds, threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/emberd"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/smollm2-135m-instruct"))
    ap.add_argument("--ort-library", default=os.path.join(ROOT, "vendor/onnxruntime/lib/libonnxruntime.so"))
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--warmup-min", type=float, default=None, help="default: a tenth of the run, at least 1")
    ap.add_argument("--broker-restart-s", type=float, default=180)
    ap.add_argument("--max-drift", type=float, default=2.0, help="percent")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--only", default=None,
                    help="comma-separated actions to run instead of the mix (stream, cancel, hangup, "
                         "bad, http, mqtt): to find which one a drift comes with")
    ap.add_argument("--wrap", default=None,
                    help="a command the daemon runs under, e.g. 'heaptrack -o /tmp/emberd'")
    ap.add_argument("--kill", action="store_true",
                    help="end the daemon with SIGKILL (a heap profiler then sees what was live)")
    args = ap.parse_args()
    random.seed(7)
    work = tempfile.mkdtemp(prefix="emberd-soak-")
    broker = Broker(work)
    http_port = free_port()
    sock_path = os.path.join(work, "emberd.sock")
    config = os.path.join(work, "emberd.toml")
    with open(config, "w") as f:
        f.write(f'[model]\ndir = "{args.model}"\nort_library = "{args.ort_library}"\n'
                f'[limits]\nmax_queue = 8\nmax_batch = 4\n'
                f'[socket]\npath = "{sock_path}"\n'
                f'[http]\nenabled = true\nlisten = "127.0.0.1:{http_port}"\n'
                f'[mqtt]\nenabled = true\nport = {broker.port}\ndevice_id = "soak"\n'
                f'[log]\njournald = "off"\n')
    log = open(os.path.join(work, "emberd.log"), "w")
    wrap = args.wrap.split() if args.wrap else []
    daemon = subprocess.Popen(wrap + [args.binary, "serve", "--config", config], stderr=subprocess.PIPE,
                              text=True)
    for line in daemon.stderr:
        log.write(line)
        if "ready: model" in line:
            break
    else:
        raise SystemExit(f"emberd exited: {open(log.name).read()}")
    threading.Thread(target=lambda: [log.write(l) for l in daemon.stderr], daemon=True).start()
    pid = emberd_pid(daemon.pid)
    model = os.path.basename(args.model.rstrip("/"))
    tally = Tally()
    stop = threading.Event()
    restarts = [0, 0.0]  # how many, and when the last one was

    # --only: each action stands for a roll that picks it from the mix below
    rolls = {"stream": 0.1, "cancel": 0.35, "hangup": 0.45, "bad": 0.5, "http": 0.6, "mqtt": 0.9}
    only = None if args.only is None else [rolls[a] for a in args.only.split(",")]

    def worker(w):
        caller = MqttCaller(broker.port, "soak", f"soak-caller-{w}")
        n = 0
        while not stop.is_set():
            n += 1
            roll = random.random() if only is None else only[n % len(only)]
            try:
                if roll < 0.30:
                    socket_action(sock_path, "stream", tally, f"{w}-{n}")
                elif roll < 0.40:
                    socket_action(sock_path, "cancel", tally, f"{w}-{n}")
                elif roll < 0.47:
                    socket_action(sock_path, "hangup", tally, f"{w}-{n}")
                elif roll < 0.55:
                    socket_action(sock_path, "bad", tally, f"{w}-{n}")
                elif roll < 0.80:
                    http_action(http_port, model, tally)
                else:
                    caller.call(f"m{w}-{n}", tally, restarts)
            except Exception as e:  # noqa: BLE001 - a soak reports every failure and goes on
                tally.fail(f"worker {w}: {type(e).__name__}: {e}")
        caller.client.loop_stop()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.workers)]
    for t in threads:
        t.start()
    samples = []
    started = time.time()
    end = started + args.minutes * 60
    next_restart = started + args.broker_restart_s
    out = open(args.csv, "w") if args.csv else None
    if out:
        out.write("elapsed_s,rss_mib,fds,threads\n")
    while time.time() < end:
        time.sleep(args.sample_s)
        if daemon.poll() is not None:
            tally.fail(f"emberd exited with {daemon.returncode}")
            break
        rss, fds, nthreads = proc_figures(pid)
        elapsed = time.time() - started
        samples.append((elapsed, rss, fds, nthreads))
        if out:
            out.write(f"{elapsed:.0f},{rss:.1f},{fds},{nthreads}\n")
            out.flush()
        print(f"[soak] {elapsed/60:5.1f} min  RSS {rss:7.1f} MiB  fds {fds:3d}  threads {nthreads:3d}  "
              f"done so far {sum(v for k, v in tally.counts.items())}", flush=True)
        if time.time() >= next_restart:
            broker.kill()
            time.sleep(1)
            broker.start()
            restarts[0] += 1
            restarts[1] = time.time()
            next_restart = time.time() + args.broker_restart_s
    stop.set()
    for t in threads:
        t.join(timeout=130)
    if args.kill:
        os.kill(pid, signal.SIGKILL)
        daemon.wait(timeout=600)   # a wrapping profiler writes its file
    else:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        if code != 0:
            tally.fail(f"emberd exited {code} on SIGTERM")
    broker.kill()

    warm = args.warmup_min if args.warmup_min is not None else max(1.0, args.minutes / 10)
    after = [s for s in samples if s[0] >= warm * 60]
    print("\n[soak] samples (elapsed min, RSS MiB, fds, threads):")
    for label, s in (("start", samples[0]), ("warm", after[0] if after else samples[0]),
                     ("middle", samples[len(samples) // 2]), ("end", samples[-1])):
        print(f"  {label:6s} {s[0]/60:5.1f}  {s[1]:7.1f}  {s[2]:3d}  {s[3]:3d}")
    drift = float("nan")
    if len(after) >= 10:
        first = statistics.median(s[1] for s in after[:5])
        last = statistics.median(s[1] for s in after[-5:])
        drift = (last - first) / first * 100
        print(f"[soak] RSS after warm-up: {first:.1f} -> {last:.1f} MiB, drift {drift:+.2f}%")
    print(f"[soak] {args.minutes} min, {args.workers} workers, {restarts[0]} broker restarts; actions:")
    for k, v in sorted(tally.counts.items()):
        print(f"  {k:32s} {v}")
    print(f"[soak] broken promises: {len(tally.broken)}; emberd log: {log.name}")
    failed = bool(tally.broken) or not (abs(drift) <= args.max_drift)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
