#!/usr/bin/env python3
"""Compares `kernel_bits` output from x86-64 with aarch64's: for every product where all
of x86's vector paths give the same bits, every NEON path must give those bits too. Where
the x86 paths differ among themselves (or for the portable code, whose sums LLVM orders
per target) the result is printed, not required. Exits 1 on a disagreement."""
import sys
from collections import defaultdict


def read(path):
    rows = defaultdict(dict)
    with open(path) as f:
        for line in f:
            item, level, h = line.rstrip("\n").split("\t")
            rows[item][level] = h
    return rows


x86, arm = read(sys.argv[1]), read(sys.argv[2])
bad, same, free = [], 0, []
for item in sorted(x86):
    vec = {l: h for l, h in x86[item].items() if l != "portable"}
    neon = {l: h for l, h in arm.get(item, {}).items() if l.startswith("neon")}
    if not neon:
        bad.append(f"{item}: no NEON result")
        continue
    if len(set(vec.values())) == 1:
        want = next(iter(vec.values()))
        for l, h in neon.items():
            if h == want:
                same += 1
            else:
                bad.append(f"{item}: {l} {h}, x86 {want}")
    else:
        free.append(f"{item}: x86 paths differ ({vec}); NEON {neon}")
for line in free:
    print("  not required:", line)
for line in bad:
    print("  DIFFERENT:", line)
print(f"kernel bits: {same} NEON results equal x86's, {len(bad)} differ, {len(free)} not required")
sys.exit(1 if bad else 0)
