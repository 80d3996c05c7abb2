"""The official `openai` client against a running emberd (tests/http.rs starts it).

    python tests/http/openai_client.py BASE_URL MODEL

Prints one JSON object with what the client saw; the Rust test checks it. Exits non-zero
with the reason when the client raises.
"""
import json
import sys

import jsonschema
import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "Name three primary colors."}]
out = {}

out["models"] = [m.id for m in client.models.list().data]

whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, seed=1
)
out["whole_text"] = whole.choices[0].message.content
out["whole_finish"] = whole.choices[0].finish_reason
out["whole_usage"] = whole.usage.model_dump()

# In between, a raw completion shares no prefix with the chat prompt, so the streamed request
# below is prefilled from scratch like the first. (A fully cached prompt reruns only its last
# token, and ONNX Runtime's int8 kernels round a one-row product differently at a near tie.)
completion = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0
)
out["completion_text"] = completion.choices[0].text

pieces, finishes, roles, usage = [], [], [], None
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
out["stream_text"] = "".join(pieces)
out["stream_pieces"] = len(pieces)
out["stream_roles"] = roles
out["stream_finishes"] = finishes
out["stream_usage"] = usage

# Structured output as the OpenAI documentation shows it: response_format json_schema, strict.
schema = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "rgb": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                            "maximum": 255},
                                 "minItems": 3, "maxItems": 3}},
          "required": ["name", "rgb"], "additionalProperties": False}
held = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Describe the color of the sky as JSON."}],
    max_tokens=64, temperature=1.0, seed=3,
    response_format={"type": "json_schema",
                     "json_schema": {"name": "color", "schema": schema, "strict": True}},
)
out["schema_text"] = held.choices[0].message.content
out["schema_finish"] = held.choices[0].finish_reason
out["schema_valid"] = not list(
    jsonschema.Draft202012Validator(schema).iter_errors(json.loads(out["schema_text"])))

for name, call in [
    ("unknown_model", lambda: client.chat.completions.create(model="gpt-4o", messages=messages)),
    (
        "bad_schema",
        lambda: client.chat.completions.create(
            model=model, messages=messages,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nothing"}}},
        ),
    ),
    (
        "unsupported_field",
        lambda: client.chat.completions.create(
            model=model, messages=messages, logit_bias={"50256": -100}
        ),
    ),
]:
    try:
        call()
        out[name] = None
    except openai.APIStatusError as e:
        out[name] = {"status": e.status_code, "body": e.body}

print(json.dumps(out))
