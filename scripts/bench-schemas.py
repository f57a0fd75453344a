#!/usr/bin/env python3
"""Schema coverage on any OpenAI-compatible server: for every JSON schema file in a
directory (e.g. JSONSchemaBench's real-world sets), ask for a JSON object that follows it
(greedy, /v1/chat/completions with response_format json_schema) and count how many the
server accepts, how many replies finish, and how many finished replies validate (Python's
jsonschema; run with a python that has it, e.g. target/test-venv/bin/python).

  bench-schemas.py --base http://127.0.0.1:8080 --dir SCHEMAS [--tokens 256] [--out replies.jsonl]
"""
import argparse, json, os, sys, urllib.error, urllib.request

import jsonschema

SCHEMA_CHARS = 1500


def ask(base, schema, tokens):
    shown = json.dumps(schema)[:SCHEMA_CHARS]
    body = {"model": "gemma3", "temperature": 0, "max_tokens": tokens,
            "messages": [{"role": "user", "content": f"A JSON object that follows this JSON schema:\n{shown}"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return 200, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out")
    a = ap.parse_args()
    files = sorted(f for f in os.listdir(a.dir) if f.endswith(".json"))
    accepted = finished = valid = 0
    out = open(a.out, "w") if a.out else None
    for f in files:
        schema = json.load(open(os.path.join(a.dir, f)))
        status, v = ask(a.base, schema, a.tokens)
        rec = {"file": f, "status": status}
        if status == 200:
            accepted += 1
            c = v["choices"][0]
            rec["finish"] = c["finish_reason"]
            rec["text"] = c["message"]["content"]
            if c["finish_reason"] == "stop":
                finished += 1
                try:
                    jsonschema.validate(json.loads(c["message"]["content"]), schema)
                    valid += 1
                    rec["valid"] = True
                except Exception as e:  # noqa: BLE001
                    rec["valid"] = False
                    print(f"INVALID {f}: {str(e)[:200]}", file=sys.stderr)
        else:
            rec["error"] = v
        if out:
            out.write(json.dumps(rec) + "\n")
    n = len(files)
    print(f"schemas {n}: accepted {accepted} ({100 * accepted / max(n, 1):.0f}%), finished {finished}, "
          f"finished and valid {valid}, finished but invalid {finished - valid}")


if __name__ == "__main__":
    main()
