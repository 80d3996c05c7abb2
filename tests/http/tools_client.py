"""Tool calls through the official `openai` and `ollama` clients against a running emberd
(tests/http.rs starts it), with the two-tool house of tests/tools/home.tools.json.

    python tests/http/tools_client.py BASE_URL MODEL SEEDS

Prints one JSON object with what the clients saw; every call's arguments are checked here
against its tool's parameter schema with `jsonschema` (a real validator), and the Rust test
checks the rest. Exits non-zero with the reason when a client raises.
"""
import json
import pathlib
import sys

import jsonschema
import ollama
import openai

base_url, model, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3])
tools = json.loads((pathlib.Path(__file__).parent.parent / "tools/home.tools.json").read_text())
schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
prompts = ["Turn on the light in the kitchen.", "How warm is it in the bedroom?"]
out = {}


def problems(name, arguments):
    """What is wrong with a call: an unknown function, or arguments its schema refuses."""
    if name not in schemas:
        return [f"unknown function {name!r}"]
    validator = jsonschema.Draft202012Validator(schemas[name])
    return [e.message for e in validator.iter_errors(arguments)]


# --- OpenAI ---
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

calls, invalid, finishes = [], [], set()
for seed in range(seeds):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompts[seed % 2]}],
        tools=tools, tool_choice="required", temperature=1.0, seed=seed, max_tokens=64)
    choice = response.choices[0]
    finishes.add(choice.finish_reason)
    for call in choice.message.tool_calls or []:
        arguments = json.loads(call.function.arguments)
        calls.append({"id": call.id, "name": call.function.name, "arguments": arguments})
        invalid += problems(call.function.name, arguments)
out["openai_required"] = {"calls": calls, "invalid": invalid, "finishes": sorted(finishes),
                          "responses": seeds}

# Streamed: the call arrives in deltas that the client joins, then finish_reason tool_calls.
joined, content, finishes = {}, [], []
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompts[0]}], tools=tools,
    tool_choice={"type": "function", "function": {"name": "set_light"}}, temperature=0,
    max_tokens=64, stream=True)
for chunk in stream:
    for choice in chunk.choices:
        if choice.delta.content:
            content.append(choice.delta.content)
        for delta in choice.delta.tool_calls or []:
            call = joined.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
streamed = [dict(c, arguments=json.loads(c["arguments"])) for c in joined.values()]
out["openai_stream"] = {"calls": streamed, "content": "".join(content), "finishes": finishes,
                        "invalid": [p for c in streamed for p in problems(c["name"], c["arguments"])]}

# auto: the model answers in text or calls; either way a call holds to its schema.
auto = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompts[1]}], tools=tools,
    tool_choice="auto", temperature=0, max_tokens=48)
message = auto.choices[0].message
out["openai_auto"] = {
    "content": message.content, "finish": auto.choices[0].finish_reason,
    "calls": [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
              for c in message.tool_calls or []],
    "invalid": [p for c in message.tool_calls or []
                for p in problems(c.function.name, json.loads(c.function.arguments))]}

# none: text.
none = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompts[0]}], tools=tools,
    tool_choice="none", temperature=0, max_tokens=32)
out["openai_none"] = {"content": none.choices[0].message.content,
                      "tool_calls": none.choices[0].message.tool_calls,
                      "finish": none.choices[0].finish_reason}

# The call's result goes back as a tool message; the model answers it.
first = out["openai_stream"]["calls"][0]
history = [
    {"role": "user", "content": prompts[0]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": first["id"], "type": "function",
         "function": {"name": first["name"], "arguments": json.dumps(first["arguments"])}}]},
    {"role": "tool", "tool_call_id": first["id"], "content": json.dumps({"ok": True})},
]
answer = client.chat.completions.create(model=model, messages=history, tools=tools,
                                        temperature=0, max_tokens=32)
out["openai_result"] = {"content": answer.choices[0].message.content,
                        "tool_calls": answer.choices[0].message.tool_calls is not None,
                        "finish": answer.choices[0].finish_reason}

# --- Ollama: no tool_choice in its API; the daemon's [generation] tool_choice = "required"
# makes a user's message answered by a call, and a tool's result answered as auto. ---
oc = ollama.Client(host=base_url)
calls, invalid, texts = [], [], []
for seed in range(seeds):
    response = oc.chat(model=model, messages=[{"role": "user", "content": prompts[seed % 2]}],
                       tools=tools, stream=False,
                       options={"temperature": 1.0, "seed": seed, "num_predict": 64})
    for call in response.message.tool_calls or []:
        calls.append({"name": call.function.name, "arguments": dict(call.function.arguments)})
        invalid += problems(call.function.name, dict(call.function.arguments))
    if not response.message.tool_calls:
        texts.append(response.message.content)
out["ollama_required"] = {"calls": calls, "invalid": invalid, "texts": texts,
                          "responses": seeds}

# Streamed, then the result of the call as a tool message.
streamed_calls, pieces, dones = [], [], 0
for chunk in oc.chat(model=model, messages=[{"role": "user", "content": prompts[1]}],
                     tools=tools, stream=True, options={"temperature": 0, "num_predict": 64}):
    streamed_calls += chunk.message.tool_calls or []
    if chunk.message.content:
        pieces.append(chunk.message.content)
    dones += chunk.done
out["ollama_stream"] = {
    "calls": [{"name": c.function.name, "arguments": dict(c.function.arguments)}
              for c in streamed_calls],
    "content": "".join(pieces), "dones": dones}
history = [{"role": "user", "content": prompts[1]}]
if streamed_calls:
    history.append({"role": "assistant", "content": "", "tool_calls": streamed_calls})
    history.append({"role": "tool", "content": json.dumps({"celsius": 19.5}),
                    "tool_name": streamed_calls[0].function.name})
answer = oc.chat(model=model, messages=history, tools=tools, stream=False,
                 options={"temperature": 0, "num_predict": 32})
out["ollama_result"] = {"content": answer.message.content,
                        "tool_calls": bool(answer.message.tool_calls)}

print(json.dumps(out, default=str))
