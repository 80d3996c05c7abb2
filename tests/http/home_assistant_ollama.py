"""Replays what Home Assistant's Ollama integration sends (homeassistant/components/ollama,
2026.2: config_flow.py, __init__.py, entity.py) against a running emberd, through the same
`ollama` AsyncClient and with the same argument shapes (tests/http.rs starts emberd).

    python tests/http/home_assistant_ollama.py BASE_URL MODEL

The sequence: the entry's setup (`list()` under a 5 s timeout); the subentry flow's model
check (an exact match on `models[].model`) and its pull (`pull(model)`, stream false) of a
model already present, and of one that is not; the coordinator's poll (`list()`, `ps()`);
then a conversation turn as `_async_handle_chat_log` runs it: `chat()` streaming with the
Assist API's tools (the schemas as the client sends them: type, properties, required,
items, enum, description), `keep_alive="-1s"`, `options={"num_ctx": 8192}`, `think=False`,
reading each chunk as `_transform_stream` does, running the calls, and calling again with
the assistant's calls and the tools' results (role "tool", no tool_name) until an answer
comes without calls, at most 10 times; and an AI Task with `format` (a JSON Schema).

Prints one JSON object with what it saw; the Rust test checks it. Exits non-zero when the
client raises where Home Assistant would fail.
"""
import asyncio
import json
import sys

import jsonschema
import ollama

base_url, model = sys.argv[1], sys.argv[2]
MAX_TOOL_ITERATIONS = 10  # homeassistant/components/ollama/const.py

# The tools as Home Assistant's _format_tool makes them and the ollama client sends them.
NAME_SLOTS = {"name": {"type": "string"}, "area": {"type": "string"},
              "floor": {"type": "string"},
              "domain": {"type": "array", "items": {"type": "string"}}}
TOOLS = [
    {"type": "function", "function": {
        "name": "HassTurnOn",
        "description": "Turns on/opens/presses a device or entity. For locks, this performs a "
                       "'lock' action. Use for requests like 'turn on', 'activate', 'enable', "
                       "or 'lock'.",
        "parameters": {"type": "object", "required": [], "properties": dict(NAME_SLOTS, **{
            "device_class": {"type": "array", "items": {"type": "string", "enum": [
                "outlet", "switch", "awning", "blind", "curtain", "door", "garage", "tv"]}}})}}},
    {"type": "function", "function": {
        "name": "HassTurnOff",
        "description": "Turns off/closes a device or entity. For locks, this performs an "
                       "'unlock' action. Use for requests like 'turn off', 'deactivate', "
                       "'disable', or 'unlock'.",
        "parameters": {"type": "object", "required": [], "properties": dict(NAME_SLOTS)}}},
    {"type": "function", "function": {
        "name": "HassLightSet",
        "description": "Sets the brightness percentage or color of a light",
        "parameters": {"type": "object", "required": [], "properties": dict(NAME_SLOTS, **{
            "color": {"type": "string"}, "temperature": {"type": "integer"},
            "brightness": {"type": "integer", "description":
                           "The brightness percentage of the light between 0 and 100, where "
                           "0 is off and 100 is fully lit"}})}}},
    {"type": "function", "function": {
        "name": "GetLiveContext",
        "description": "Provides real-time information about the CURRENT state, value, or "
                       "mode of devices, sensors, entities, or areas.",
        "parameters": {"type": "object", "required": [], "properties": {}}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# chat_log.async_provide_llm_data: the instructions, the Assist API's prompt, the time.
SYSTEM = ("You are a voice assistant for Home Assistant.\nAnswer questions about the world "
          "truthfully.\nAnswer in plain text. Keep it simple and to the point.\n"
          "When controlling Home Assistant always call the intent tools.\n"
          "An overview of the areas and the devices in this smart home:\n"
          "- names: Kitchen Light\n  domain: light\n  areas: Kitchen\n"
          "Current time is 18:02:11. Today's date is 2026-12-03.")


def parse_tool_args(arguments):
    """entity.py's _parse_tool_args: drops empty values, decodes JSON-looking strings."""
    out = {}
    for key, value in arguments.items():
        if value is None or value == "":
            continue
        if isinstance(value, str) and value[:1] in "[{" and value[-1:] in "]}":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def run_tool(name, arguments):
    """What Home Assistant sends back: an intent's response, or the live context."""
    if name == "GetLiveContext":
        return {"success": True, "result": "- names: Kitchen Light\n  domain: light\n"
                                           "  state: 'on'\n  areas: Kitchen\n"}
    return {"speech": {}, "response_type": "action_done",
            "data": {"targets": [], "failed": [],
                     "success": [{"name": "Kitchen Light", "type": "entity",
                                  "id": "light.kitchen"}]}}


async def main():
    out = {}
    client = ollama.AsyncClient(host=base_url)

    # __init__.py: async_setup_entry checks the server answers.
    async with asyncio.timeout(5.0):
        await client.list()
    # config_flow.py: the subentry's model check, on the list's `model` field.
    response = await client.list()
    downloaded = {info["model"] for info in response.get("models", [])}
    out["downloaded"] = sorted(downloaded)
    # It pulls only what is missing; a pull of what is present must succeed too.
    out["pull_present"] = (await client.pull(model))["status"]
    try:
        await client.pull("llama3.2:latest")
        out["pull_missing"] = "succeeded"
    except ollama.ResponseError as e:
        out["pull_missing"] = {"status": e.status_code, "error": e.error}
    # coordinator.py (newer releases): the poll.
    installed, loaded = await asyncio.gather(client.list(), client.ps())
    out["poll"] = {"installed": [m["model"] for m in installed["models"]],
                   "loaded": [{"model": m["model"], "size": m["size"],
                               "size_vram": m["size_vram"]} for m in loaded["models"]]}

    # entity.py: _async_handle_chat_log.
    messages = [ollama.Message(role="system", content=SYSTEM),
                ollama.Message(role="user", content="Turn on the kitchen light.")]
    turns = []
    for _ in range(MAX_TOOL_ITERATIONS):
        stream = await client.chat(model=model, messages=list(messages), tools=TOOLS,
                                   stream=True, keep_alive="-1s", options={"num_ctx": 8192},
                                   think=False, format=None)
        content, thinking, calls, chunks = "", "", [], 0
        async for chunk in stream:  # _transform_stream
            chunks += 1
            message = chunk["message"]
            for call in message.get("tool_calls") or []:
                calls.append((call["function"]["name"],
                              parse_tool_args(call["function"]["arguments"])))
            content += message.get("content") or ""
            thinking += message.get("thinking") or ""
        problems = []
        for name, arguments in calls:
            if name not in SCHEMAS:
                problems.append(f"unknown tool {name}")
            else:
                validator = jsonschema.Draft202012Validator(SCHEMAS[name])
                problems += [e.message for e in validator.iter_errors(arguments)]
        turns.append({"chunks": chunks, "content": content, "calls": calls,
                      "problems": problems})
        messages.append(ollama.Message(
            role="assistant", content=content or None, thinking=thinking or None,
            tool_calls=[ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(
                name=name, arguments=arguments)) for name, arguments in calls] or None))
        if not calls:
            break
        for name, arguments in calls:
            messages.append(ollama.Message(role="tool",
                                           content=json.dumps(run_tool(name, arguments))))
    out["turns"] = turns

    # ai_task.py: structured output, `format` a JSON Schema, no tools. A closed object with
    # the room one of the house's: sampled, a free string or an extra key's free string can
    # run on until max_tokens cuts the JSON (seen about one run in eight).
    schema = {"type": "object", "properties": {"room": {"enum": ["kitchen", "hall", "bedroom"]},
                                               "lights_on": {"type": "boolean"}},
              "required": ["room", "lights_on"], "additionalProperties": False}
    content = ""
    async for chunk in await client.chat(
            model=model, stream=True, keep_alive="-1s", options={"num_ctx": 8192},
            messages=[{"role": "system", "content": "You are a Home Assistant expert."},
                      {"role": "user", "content": "Is the kitchen light on? It is on."}],
            format=schema):
        content += chunk["message"].get("content") or ""
    answer = json.loads(content)  # ai_task: json_loads, else an error
    jsonschema.validate(answer, schema)
    out["ai_task"] = answer
    print(json.dumps(out))


asyncio.run(main())
