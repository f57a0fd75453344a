#!/usr/bin/env python3
"""Instructions the packed decode tiles execute per weight byte, NEON against AVX2.

Both instruction sets run under qemu (qemu-x86_64 -cpu max has AVX2 but no AVX-512, so
the x86 figure is the AVX2 tile with 16-bit multiply-adds; qemu-aarch64 -cpu max has the
dot-product instructions, GEMMA3_NO_VNNI=1 gives the plain-NEON tile). For each weight type
`kernel_bits decode TYPE` runs one decode product (256 x 4096 weights, one input) from a
static binary; qemu logs every translated block (`-d in_asm`) and every execution of a
block (`-d exec,nochain`) inside the tile entry points (`-dfilter` over their symbols), and
the executed instructions are summed. Instructions outside the tiles (quantizing the input,
the thread hand-off) are not counted: they do not grow with the weights.

Counts are of instructions, not time: a 256-bit AVX2 op and a 128-bit NEON op count one
each. Usage: scripts/tile-instructions.py [TYPE...]  (needs what scripts/test-aarch64.sh
installs: the aarch64 rustup target, gcc-aarch64-linux-gnu, qemu-user).
"""
import os
import pathlib
import re
import subprocess
import sys
import tempfile

root = pathlib.Path(__file__).resolve().parent.parent
types = sys.argv[1:] or ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]
# Static, non-relocated binaries (addresses in the log are those of `nm`), v0 mangling
# (symbols name the const parameters).
rustflags = "-C symbol-mangling-version=v0 -C relocation-model=static -C target-feature=+crt-static"
target_dir = root / "target" / "v0"

RUNS = [
    # (label, target, qemu, entry symbol, the kernels it must report, extra environment)
    ("x86-64 AVX2 (madd)", "x86_64-unknown-linux-gnu", "qemu-x86_64", "avx2_madd", "AVX2 (level avx2)",
     {"GEMMA3_SIMD": "avx2", "GEMMA3_NO_VNNI": "1"}),
    ("aarch64 NEON sdot", "aarch64-unknown-linux-gnu", "qemu-aarch64", "neon_dot",
     "NEON + dot product (level neon)", {"GEMMA3_SIMD": "neon"}),
    ("aarch64 NEON", "aarch64-unknown-linux-gnu", "qemu-aarch64", "neon_widen", "NEON (level neon)",
     {"GEMMA3_SIMD": "neon", "GEMMA3_NO_VNNI": "1"}),
]


def build(target):
    env = dict(os.environ, RUSTFLAGS=rustflags, CARGO_TARGET_DIR=str(target_dir))
    if target.startswith("aarch64"):
        env["CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER"] = "aarch64-linux-gnu-gcc"
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", target, "-p",
                    "gemma3-kernels", "--example", "kernel_bits"], cwd=root, env=env, check=True)
    return target_dir / target / "release" / "examples" / "kernel_bits"


def entry_ranges(binary, entry):
    out = subprocess.run(["nm", "-S", "-C", "--defined-only", str(binary)], capture_output=True,
                         text=True, check=True).stdout
    ranges = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and f"packed::isa::{entry}::<" in parts[3]:
            ranges.append(f"0x{parts[0]}+0x{parts[1]}")
    if not ranges:
        sys.exit(f"no {entry} symbols in {binary}")
    return ",".join(ranges)


def count(binary, qemu, entry, env, dtype):
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        run_env = dict(os.environ, **env)
        if qemu == "qemu-aarch64":
            run_env.setdefault("QEMU_LD_PREFIX", "/usr/aarch64-linux-gnu")
        res = subprocess.run([qemu, "-cpu", "max", "-d", "in_asm,exec,nochain", "-dfilter",
                              entry_ranges(binary, entry), "-D", log.name, str(binary), "decode", dtype],
                             capture_output=True, text=True, env=run_env, check=True)
        m = re.search(r"(\d+) weight bytes, (\d+) packed bytes, (.*)", res.stdout)
        weight_bytes, kernels = int(m.group(1)), m.group(3)
        sizes, runs, pc = {}, {}, None
        for line in open(log.name, errors="replace"):
            if line.startswith("IN:"):
                pc = None
            elif line.startswith("0x") and ":" in line:
                addr = int(line.split(":")[0], 16)
                if pc is None:
                    pc = addr
                    sizes[pc] = 0
                sizes[pc] += 1
            elif line.startswith("Trace "):
                pc = None
                block = int(line.split("[")[1].split("/")[1], 16)
                runs[block] = runs.get(block, 0) + 1
        insns = sum(n * sizes.get(b, 0) for b, n in runs.items())
        return insns, weight_bytes, kernels


def main():
    results = {}
    for label, target, qemu, entry, expect, env in RUNS:
        binary = build(target)
        for t in types:
            insns, wb, kernels = count(binary, qemu, entry, env, t)
            if kernels != expect or insns == 0:
                sys.exit(f"{label}: ran {kernels} ({insns} instructions counted), not {expect}")
            results[(label, t)] = (insns, wb, kernels)
    labels = [r[0] for r in RUNS]
    print("instructions per weight byte, one decode product (256 x 4096), executed under qemu")
    print(f"{'type':6} " + " ".join(f"{l:>20}" for l in labels) + "   NEON sdot / AVX2")
    for t in types:
        cells = [results[(l, t)][0] / results[(l, t)][1] for l in labels]
        print(f"{t:6} " + " ".join(f"{c:20.3f}" for c in cells) + f"   {cells[1] / cells[0]:.2f}x")
    print("kernels: " + "; ".join(sorted({v[2] for v in results.values()})))


main()
