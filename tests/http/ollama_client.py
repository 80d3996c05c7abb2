"""The official `ollama` client against a running emberd (tests/http.rs starts it).

    python tests/http/ollama_client.py BASE_URL MODEL

Prints one JSON object with what the client saw; the Rust test checks it. Exits non-zero
with the reason when the client raises where it should not.
"""
import json
import sys

import jsonschema
import ollama

base_url, model = sys.argv[1], sys.argv[2]
client = ollama.Client(host=base_url)
messages = [{"role": "user", "content": "Name three primary colors."}]
options = {"num_predict": 24, "temperature": 0, "seed": 1}
out = {}

out["tags"] = [m.model for m in client.list().models]
out["ps"] = [m.model_dump(mode="json") for m in client.ps().models]
show = client.show(model)
out["show"] = {
    "family": show.details.family,
    "format": show.details.format,
    "model_info": show.modelinfo,
    "capabilities": show.capabilities,
}
# What a client that preloads sends: no prompt.
out["load"] = client.generate(model=model).done_reason


def final(response):
    fields = ["done", "done_reason", "prompt_eval_count", "eval_count", "total_duration",
              "load_duration", "prompt_eval_duration", "eval_duration"]
    return {f: getattr(response, f) for f in fields}


whole = client.chat(model=model, messages=messages, options=options, stream=False)
out["chat_whole_text"] = whole.message.content
out["chat_whole"] = final(whole)

# In between, a raw prompt shares no prefix with the chat prompt, so each request below is
# prefilled from scratch like the one it is compared with (see openai_client.py).
generated = client.generate(model=model, prompt="Once upon a time", raw=True,
                            options=options, stream=False)
out["generate_whole_text"] = generated.response
out["generate_whole"] = final(generated)

pieces, dones, last = [], 0, None
# As Home Assistant's Ollama integration asks: tools (none), keep_alive, num_ctx.
for chunk in client.chat(model=model, messages=messages, stream=True, keep_alive=-1,
                         tools=[], options=dict(options, num_ctx=8192)):
    if chunk.message.content:
        pieces.append(chunk.message.content)
    if chunk.done:
        dones += 1
        last = final(chunk)
out["chat_stream_text"] = "".join(pieces)
out["chat_stream_pieces"] = len(pieces)
out["chat_stream_dones"] = dones
out["chat_stream"] = last

pieces = []
for chunk in client.generate(model=model, prompt="Once upon a time", raw=True,
                             options=options, stream=True):
    pieces.append(chunk.response or "")
out["generate_stream_text"] = "".join(pieces)

# Structured outputs, as Ollama's documentation shows them: "json", and a JSON Schema.
schema = {"type": "object",
          "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                    "minItems": 3, "maxItems": 3}},
          "required": ["colors"], "additionalProperties": False}
as_json = client.chat(model=model, messages=messages, format="json",
                      options=dict(options, num_predict=64))
out["format_json"] = as_json.message.content
out["format_json_done"] = as_json.done_reason
held = client.chat(model=model, messages=messages, format=schema,
                   options=dict(options, temperature=1.0, num_predict=64))
out["format_schema"] = held.message.content
out["format_schema_done"] = held.done_reason
out["format_schema_valid"] = not list(
    jsonschema.Draft202012Validator(schema).iter_errors(json.loads(held.message.content)))

for name, call in [
    ("unknown_model", lambda: client.chat(model="llama3:8b", messages=messages)),
    ("unsupported_option",
     lambda: client.chat(model=model, messages=messages, options={"mirostat": 2})),
    ("bad_format", lambda: client.chat(model=model, messages=messages,
                                       format={"type": "object", "minProperties": "two"})),
]:
    try:
        call()
        out[name] = None
    except ollama.ResponseError as e:
        out[name] = {"status": e.status_code, "error": e.error}

print(json.dumps(out))
