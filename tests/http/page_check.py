"""The device page in a real headless Chromium, driven over the DevTools protocol.

    python tests/http/page_check.py BASE_URL MODEL SCREENSHOT.png

Loads the page, waits for the model's name, sends a prompt and records the reply's text as
it grows (streaming shows as several lengths), then sends a long prompt and presses Stop.
Prints one JSON object with what it saw; tests/http.rs checks it. The browser is Debian's
headless Chromium (`chromium-headless-shell`, or `chromium`; $EMBERD_CHROMIUM overrides).
"""
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from websockets.sync.client import connect

base_url, model, screenshot = sys.argv[1], sys.argv[2], sys.argv[3]
browser = os.environ.get("EMBERD_CHROMIUM") or next(
    (p for p in map(shutil.which, ["chromium-headless-shell", "chromium"]) if p), None)
if browser is None:
    sys.exit("no headless Chromium: apt-get install chromium-headless-shell (scripts/test.sh does)")

profile = tempfile.mkdtemp(prefix="emberd-chromium-")
browser_log = open(os.path.join(profile, "stderr.log"), "w+b")
# Its own process group: Debian's launcher is a shell script that runs the browser as a child,
# and both must go at the end.
proc = subprocess.Popen(
    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
     "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
     f"--user-data-dir={profile}", "--window-size=900,900", "about:blank"],
    stdout=subprocess.DEVNULL, stderr=browser_log, start_new_session=True)


def stop_browser():
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def fail(why):
    stop_browser()
    browser_log.seek(0)
    log = browser_log.read().decode(errors="replace")[-3000:]
    sys.exit(f"{why}\nchromium's stderr:\n{log}")


port_file = os.path.join(profile, "DevToolsActivePort")
patience = float(os.environ.get("EMBERD_PAGE_PATIENCE", "120"))
deadline = time.time() + patience
while not os.path.exists(port_file) or not open(port_file).read().strip():
    if proc.poll() is not None or time.time() > deadline:
        fail("chromium did not open its DevTools port")
    time.sleep(0.1)
port = open(port_file).read().split()[0]
targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

closing = contextlib.ExitStack()
ws = closing.enter_context(connect(page_ws, max_size=None))
next_id = 0
exceptions = []


def call(method, **params):
    global next_id
    next_id += 1
    ws.send(json.dumps({"id": next_id, "method": method, "params": params}))
    while True:
        msg = json.loads(ws.recv(timeout=patience))
        if msg.get("method") == "Runtime.exceptionThrown":
            exceptions.append(msg["params"]["exceptionDetails"].get("text"))
        if msg.get("id") == next_id:
            if "error" in msg:
                fail(f"{method}: {msg['error']}")
            return msg.get("result", {})


def js(expression):
    result = call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
        fail(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")


def wait_for(expression, timeout, what):
    """Polls until `expression` is truthy; one that throws (the page is still loading after
    Page.navigate returns) counts as not yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" not in result and result["result"].get("value"):
            return result["result"]["value"]
        time.sleep(0.05)
    fail(f"timed out waiting for {what}: {expression}")


text = lambda id: js(f"document.getElementById({id!r}).textContent")
out = {}
call("Runtime.enable")
call("Page.enable")
call("Page.navigate", url=base_url + "/")
wait_for(f"document.getElementById('model').textContent.startsWith({model!r})", patience,
         "the status")
out["title"] = js("document.title")
out["status"] = {k: text(k) for k in ["model", "engine", "provider", "queue", "uptime"]}

# A prompt: the reply should grow piece by piece.
js("document.getElementById('prompt').value = 'Name three primary colors.'")
js("document.getElementById('send').click()")
lengths = []
deadline = time.time() + patience
while time.time() < deadline:
    n = js("document.getElementById('output').textContent.length")
    if not lengths or lengths[-1] != n:
        lengths.append(n)
    if n > 0 and js("!document.getElementById('send').disabled"):
        break
    time.sleep(0.01)
out["lengths_seen"] = lengths
out["reply"] = text("output")
out["ttft"] = text("ttft")
out["tps"] = text("tps")
out["tokens"] = text("tokens")
out["error"] = text("error")
png = call("Page.captureScreenshot", format="png")["data"]
with open(screenshot, "wb") as f:
    f.write(base64.b64decode(png))

# A long answer, stopped once it has started.
js("document.getElementById('prompt').value = 'Tell me a very long story about a dragon.'")
js("document.getElementById('send').click()")
wait_for("document.getElementById('output').textContent.length > 20", patience, "a long reply")
js("document.getElementById('stop').click()")
wait_for("!document.getElementById('send').disabled", patience, "the stop")
out["stopped_error"] = text("error")
out["stopped_reply_length"] = len(text("output"))
out["exceptions"] = exceptions
closing.close()
stop_browser()
shutil.rmtree(profile, ignore_errors=True)
print(json.dumps(out))
