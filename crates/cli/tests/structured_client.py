"""Structured output and tool calls on `gemma3 serve`, through the official `openai` client
(run by tests/structured.rs, with the real 270M model).

- response_format json_schema over a table of schemas (nested objects, arrays with
  min/max items, enums, anyOf, $ref/$defs, pattern, numeric bounds, optional properties,
  additionalProperties false): every finished reply parses and validates (jsonschema);
  json_object parses; the `regex` and `grammar` (Lark) extensions are obeyed; a schema the
  grammar engine cannot compile is a 400 naming the reason; /v1/completions too.
- tools: `required` and a named tool give calls whose arguments validate; streamed calls
  assemble to the non-streamed ones; a second turn with the tool's result runs; on a server
  whose template reads `tools` (FunctionGemma's shape) `auto` and `required` work too.
- 16 concurrent constrained requests each equal their solo run.
"""

import argparse
import concurrent.futures
import json
import re
import sys

import jsonschema
import openai

FAILED = []


def check(cond, what):
    if cond:
        print(f"ok: {what}")
    else:
        print(f"FAILED: {what}")
        FAILED.append(what)


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "population": {"type": "integer", "minimum": 0},
                },
                "required": ["name", "population"],
                "additionalProperties": False,
            }
        },
        "required": ["city"],
        "additionalProperties": False,
    },
    "array_bounds_enum": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"type": "string", "enum": ["red", "green", "blue"]},
                "minItems": 2,
                "maxItems": 3,
            }
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    "any_of": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}},
                "required": ["kind", "radius"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1}},
                "required": ["kind", "side"],
                "additionalProperties": False,
            },
        ]
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {
            "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        },
        "required": ["phone", "zip"],
        "additionalProperties": False,
    },
    "numeric_bounds": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": 10, "maximum": 20},
        },
        "required": ["score", "count"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "subtitle": {"type": "string", "maxLength": 30},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "enum_only": {"type": "string", "enum": ["yes", "no", "maybe"]},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"}},
            "required": ["id", "done"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
}

PROMPTS = {
    "person": "Describe a person as JSON.",
    "nested": "Give a city and its population as JSON.",
    "array_bounds_enum": "List some colors as JSON.",
    "any_of": "Describe a shape as JSON.",
    "refs": "Give a line segment as JSON.",
    "pattern": "Give a phone number and a zip code as JSON.",
    "numeric_bounds": "Give a score and a count as JSON.",
    "optional": "Describe a book as JSON.",
    "enum_only": "Is the sky blue? Answer as JSON.",
    "array_of_objects": "List some tasks as JSON.",
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "maxLength": 30}},
                "required": ["timezone"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def chat(client, model, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def check_calls(calls, what, only=None):
    check(bool(calls), f"{what}: made calls")
    for c in calls or []:
        name = c.function.name
        ok = name in PARAMS and (only is None or name == only)
        args = None
        try:
            args = json.loads(c.function.arguments)
            jsonschema.validate(args, PARAMS[name])
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"   {name} {c.function.arguments!r}: {e}")
        check(ok and c.id and c.type == "function", f"{what}: call {name}({c.function.arguments}) validates")


def stream_calls(client, model, **kw):
    """Assembles a streamed reply's content and calls from the deltas."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, temperature=0, stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        if ch.finish_reason:
            finish = ch.finish_reason
        d = ch.delta
        if d.content:
            content += d.content
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                c["id"] = tc.id
            if tc.function and tc.function.name:
                c["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                c["arguments"] += tc.function.arguments
    return content, [calls[i] for i in sorted(calls)], finish


def schemas(client, model):
    finished = 0
    for name, schema in SCHEMAS.items():
        r = chat(client, model, PROMPTS[name], response_format=schema_format(name), max_tokens=160)
        c = r.choices[0]
        text = c.message.content
        if c.finish_reason != "stop":
            print(f"   {name}: cut off at max_tokens ({c.finish_reason}): {text!r}")
            continue
        finished += 1
        try:
            jsonschema.validate(json.loads(text), schema)
            check(True, f"json_schema {name}: {text}")
        except Exception as e:  # noqa: BLE001
            check(False, f"json_schema {name}: {text!r} ({e})")
    check(finished >= len(SCHEMAS) * 3 // 4, f"{finished} of {len(SCHEMAS)} schema replies finished")

    r = chat(client, model, "Give me a JSON object.", response_format={"type": "json_object"}, max_tokens=120)
    if r.choices[0].finish_reason == "stop":
        check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object parses as an object")

    r = chat(client, model, "A phone number:", max_tokens=20, extra_body={"regex": "[0-9]{3}-[0-9]{4}"})
    check(re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].message.content) is not None,
          f"regex obeyed: {r.choices[0].message.content!r}")
    check(r.choices[0].finish_reason == "stop", "a complete regex match ends the reply")

    lark = 'start: answer "."\nanswer: "yes" | "no" | "perhaps"\n'
    r = chat(client, model, "Is water wet?", max_tokens=20, extra_body={"grammar": lark})
    check(r.choices[0].message.content in ("yes.", "no.", "perhaps."), f"Lark grammar obeyed: {r.choices[0].message.content!r}")

    r = client.completions.create(
        model=model, prompt="A person as JSON:", max_tokens=160, temperature=0,
        extra_body={"response_format": schema_format("person")},
    )
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["person"])
        check(True, f"/v1/completions json_schema: {r.choices[0].text}")

    # Logprobs and n > 1 under a schema.
    r = chat(client, model, PROMPTS["enum_only"], response_format=schema_format("enum_only"),
             max_tokens=10, logprobs=True, top_logprobs=2, n=2, temperature=1.0, seed=3)
    for c in r.choices:
        check(json.loads(c.message.content) in ("yes", "no", "maybe"), f"n=2 choice {c.index}: {c.message.content}")
        check(c.logprobs is not None and len(c.logprobs.content) > 0, "logprobs of a constrained reply")

    bad = {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}
    try:
        chat(client, model, "x", response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}}, max_tokens=5)
        check(False, "an unsupported schema is refused")
    except openai.BadRequestError as e:
        msg = str(e)
        check("cannot be used to constrain" in msg, f"an unsupported schema is a 400 with the reason: {msg[:160]}")
    try:
        chat(client, model, "x", max_tokens=5, extra_body={"regex": "(unclosed"})
        check(False, "a bad regex is refused")
    except openai.BadRequestError:
        check(True, "a bad regex is a 400")


def tools(client, model, fg=False):
    tag = "FunctionGemma template" if fg else "built-in format"
    q = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=q, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=120)
    c = r.choices[0]
    check(c.finish_reason == "tool_calls", f"{tag}: required ends with tool_calls ({c.finish_reason})")
    check_calls(c.message.tool_calls, f"{tag}: required")

    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=model, messages=q, tools=TOOLS, tool_choice=named,
                                       temperature=0, max_tokens=120)
    calls = r.choices[0].message.tool_calls
    check_calls(calls, f"{tag}: named tool", only="get_time")
    check(calls is not None and len(calls) == 1, f"{tag}: a named tool is called once")

    # Streamed calls assemble to the non-streamed ones.
    whole = client.chat.completions.create(model=model, messages=q, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=120)
    content, scalls, finish = stream_calls(client, model, messages=q, tools=TOOLS, tool_choice="required", max_tokens=120)
    # Ids differ between two requests; the names and arguments are the same reply's.
    wcalls = [{"name": x.function.name, "arguments": x.function.arguments}
              for x in whole.choices[0].message.tool_calls or []]
    check(all(c["id"] for c in scalls), f"{tag}: streamed calls carry ids")
    scalls = [{"name": c["name"], "arguments": c["arguments"]} for c in scalls]
    check(scalls == wcalls, f"{tag}: streamed calls equal the non-streamed ones ({scalls})")
    check(finish == whole.choices[0].finish_reason, f"{tag}: same finish_reason streamed")

    # auto: text or complete, valid calls.
    for prompt in ("What is the weather in Paris?", "Say hello."):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=80)
        c = r.choices[0]
        if c.message.tool_calls:
            check_calls(c.message.tool_calls, f"{tag}: auto ({prompt})")
        else:
            check(c.message.content is not None, f"{tag}: auto answered in text ({c.finish_reason})")

    # A second turn with the tool's result.
    first = whole.choices[0].message
    history = q + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": t.id, "type": "function", "function": {"name": t.function.name, "arguments": t.function.arguments}}
            for t in first.tool_calls]},
    ] + [{"role": "tool", "tool_call_id": t.id, "content": json.dumps({"temperature": 21})} for t in first.tool_calls]
    r = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=24)
    check(r.choices[0].finish_reason in ("stop", "length", "tool_calls"), f"{tag}: a second turn with the tool result runs")
    r = client.chat.completions.create(model=model, messages=history, temperature=0, max_tokens=16)
    check(r.choices[0].message.content is not None, f"{tag}: the history renders without tools too")


def batch_invariance(client, model):
    jobs = []
    names = list(SCHEMAS)
    for i in range(16):
        name = names[i % len(names)]
        jobs.append(dict(response_format=schema_format(name), max_tokens=48 + i,
                         messages=[{"role": "user", "content": f"{PROMPTS[name]} ({i})"}]))

    def run(kw):
        r = client.chat.completions.create(model=model, temperature=0.8, seed=11, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    solo = [run(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(run, jobs))
    for i, (a, b) in enumerate(zip(solo, together)):
        check(a == b, f"constrained request {i} alone == among 16 ({a[1]})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--fg-base", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base, api_key="none", timeout=300)
    model = client.models.list().data[0].id
    schemas(client, model)
    tools(client, model)
    fg = openai.OpenAI(base_url=a.fg_base, api_key="none", timeout=300)
    tools(fg, fg.models.list().data[0].id, fg=True)
    batch_invariance(client, model)
    if FAILED:
        print(f"{len(FAILED)} checks failed")
        sys.exit(1)
    print("all structured output checks passed")


if __name__ == "__main__":
    main()
