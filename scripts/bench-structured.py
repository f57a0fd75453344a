#!/usr/bin/env python3
"""What a JSON schema costs in throughput, on any OpenAI-compatible server (stdlib only).

  scripts/bench-structured.py --base http://127.0.0.1:8080 --streams 1,16 --tokens 128

For each concurrency N it sends N /v1/completions requests at once, twice: unconstrained
(ignore_eos, so every reply has the full length) and with a response_format JSON schema
whose string is long enough that the reply runs to max_tokens too. It prints the aggregate
generated tokens/s of each (completion tokens over the wall time) and their ratio.
"""
import argparse, json, threading, time, urllib.request

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "story": {"type": "string", "minLength": 2000},
    },
    "required": ["title", "year", "story"],
    "additionalProperties": False,
}


def one(base, i, tokens, schema, out):
    body = {"model": "gemma3", "prompt": f"Story number {i} as JSON with a title, a year and the story:\n",
            "max_tokens": tokens, "temperature": 0}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        v = json.load(r)
    out.append(v["usage"]["completion_tokens"])


def level(base, n, tokens, schema):
    out, ts = [], []
    t0 = time.time()
    for i in range(n):
        t = threading.Thread(target=one, args=(base, i, tokens, schema, out))
        t.start()
        ts.append(t)
    for t in ts:
        t.join()
    wall = time.time() - t0
    return sum(out) / wall, sum(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    level(a.base, 2, 8, True)  # warm up: the grammar engine's token trie, the caches
    for n in [int(x) for x in a.streams.split(",")]:
        best = {}
        for _ in range(a.rounds):
            for schema in (False, True):
                tps, total = level(a.base, n, a.tokens, schema)
                best[schema] = max(best.get(schema, (0, 0)), (tps, total))
        (p, pt), (s, st) = best[False], best[True]
        print(f"{n:>3} streams: unconstrained {p:7.1f} tok/s ({pt} tokens), schema {s:7.1f} tok/s "
              f"({st} tokens): {100 * s / p:5.1f}%")


if __name__ == "__main__":
    main()
