#!/usr/bin/env python3
"""The server's aggregate decode speed with speculative decoding on copy-heavy prompts, at
1, 4 and 16 concurrent streams, against the same requests with `"speculative": false`.

Starts `gemma3 serve` (target/release/gemma3, built if missing) on a free port with the
given extra arguments (e.g. `--draft MODEL`), sends STREAMS requests at once per round, each
asking the model to repeat its own ~300-token document greedily, and prints generated
tokens per second over the round's wall time (best of ROUNDS).

  scripts/bench-server-spec.py [--rounds N] [--tokens N] [-- serve arguments...]
"""
import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

root = pathlib.Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--streams", default="1,4,16")
ap.add_argument("serve_args", nargs="*")
a = ap.parse_args()

binary = root / "target/release/gemma3"
if not binary.exists():
    subprocess.run(["cargo", "build", "--release", "-p", "gemma3-cli"], cwd=root, check=True)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([str(binary), "serve", "--port", str(port), "--parallel", "16", *a.serve_args],
                          stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"
try:
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() - t0 > 120:
            sys.exit("the server did not become ready")
        time.sleep(0.3)

    def document(i):
        lines = [f"Order {1000 + i * 37 + j}: {j + 2} crates of {['apples', 'pears', 'plums', 'figs'][j % 4]} "
                 f"shipped to warehouse {chr(65 + (i + j) % 26)} on day {j + 1}." for j in range(12)]
        return "Shipping log:\n" + "\n".join(lines) + "\n\nThe same log, repeated exactly:\n" + lines[0][:10]

    def request(i, spec, out):
        body = json.dumps({"prompt": document(i), "max_tokens": a.tokens, "temperature": 0,
                           "ignore_eos": True, "speculative": spec}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out[i] = json.load(r)["usage"]["completion_tokens"]

    def metric(name):
        with urllib.request.urlopen(base + "/metrics") as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    # Warm up (page in the weights).
    request(0, False, {})
    print(f"serve {' '.join(a.serve_args) or '(prompt lookup)'}: {a.tokens} tokens per stream, best of {a.rounds}")
    for n in [int(x) for x in a.streams.split(",")]:
        rates = {}
        for spec in (False, True):
            best = 0.0
            for _ in range(a.rounds):
                out = {}
                threads = [threading.Thread(target=request, args=(i, spec, out)) for i in range(n)]
                t = time.time()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                best = max(best, sum(out.values()) / (time.time() - t))
            rates[spec] = best
        print(f"{n:3d} streams: plain {rates[False]:7.1f} tok/s   speculative {rates[True]:7.1f} tok/s   "
              f"{rates[True] / rates[False]:.2f}x")
    drafted = metric("vllm:spec_decode_num_draft_tokens_total")
    accepted = metric("vllm:spec_decode_num_accepted_tokens_total")
    if drafted:
        print(f"guesses accepted over the run: {accepted:.0f} of {drafted:.0f} ({100 * accepted / drafted:.0f}%)")
finally:
    server.terminate()
    server.wait()
