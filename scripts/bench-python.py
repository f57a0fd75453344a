#!/usr/bin/env python3
"""The Python module's speed: in-process decode against `gemma3 bench`'s tg on the same
model and threads, 8 Python threads sharing one Model against one thread, and the time
`import gemma3` takes. Run with the venv that has the module (scripts/test.sh builds it):

    target/test-venv/bin/python scripts/bench-python.py MODEL.gguf [--threads 2] [--gemma3 target/release/gemma3]
"""

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time

TOKENS = 128


def decode_rate(model, prompt):
    """Tokens per second after the first, greedy, through ignore_eos (as tg does)."""
    chunks = model.create_completion(prompt, max_tokens=TOKENS, temperature=0,
                                     ignore_eos=True, stream=True)
    first = None
    n = 0
    for c in chunks:
        if c.get("choices") and c["choices"][0].get("text"):
            n += 1  # one chunk per step; a step may carry several tokens' text
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return (TOKENS - 1) / (end - first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemma3", default="target/release/gemma3")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import time; t=time.perf_counter(); import gemma3; print(time.perf_counter()-t)"],
                         capture_output=True, text=True, check=True)
    print(f"import gemma3: {float(out.stdout) * 1000:.0f} ms")

    bench = subprocess.run([a.gemma3, "bench", "-m", a.model, "-t", str(a.threads), "-p", "0",
                            "-n", str(TOKENS), "-r", str(a.runs)],
                           capture_output=True, text=True, check=True).stdout
    print(bench.strip())
    tg = [float(x) for x in re.findall(r"tg%d\s*\|\s*([0-9.]+)" % TOKENS, bench)]

    import gemma3
    model = gemma3.Model(a.model, threads=a.threads, speculative=False)
    prompt = "The history of the city"
    decode_rate(model, prompt)  # warm up
    rates = [decode_rate(model, prompt) for _ in range(a.runs)]
    py = statistics.median(rates)
    print(f"in-process decode: {py:.1f} tok/s (median of {a.runs}; runs {', '.join(f'{r:.1f}' for r in rates)})")
    if tg:
        print(f"  = {100 * py / tg[0]:.1f}% of gemma3 bench tg{TOKENS} ({tg[0]:.1f} tok/s)")

    def aggregate(n_threads):
        prompts = [f"Story number {i}: once upon a time" for i in range(n_threads)]
        done = []

        def run(p):
            r = model.create_completion(p, max_tokens=TOKENS, temperature=0, ignore_eos=True)
            done.append(r["usage"]["completion_tokens"])

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return sum(done) / (time.perf_counter() - t)

    one = statistics.median(aggregate(1) for _ in range(3))
    eight = statistics.median(aggregate(8) for _ in range(3))
    print(f"1 thread: {one:.1f} tok/s; 8 threads on one Model: {eight:.1f} tok/s in all ({eight / one:.2f}x)")


if __name__ == "__main__":
    main()
