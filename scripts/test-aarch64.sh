#!/usr/bin/env bash
# aarch64 under emulation: the kernel tests and the model fixture tests cross-built for
# aarch64-unknown-linux-gnu and run by qemu-aarch64, with each level forced in turn (NEON
# with `sdot`, NEON without it, portable), on an emulated CPU with the dot-product
# instructions and on one without (a Cortex-A53); then the exact output bits of the
# matrix products against x86's (scripts/kernel-bits-compare.py).
#
# Needs `rustup target add aarch64-unknown-linux-gnu`, Debian's gcc-aarch64-linux-gnu (the
# linker and a C library) and qemu-user; installed when missing, SKIPPED loudly when they
# cannot be had. `--real` adds the real 270M model's teacher-forced agreement test under
# NEON (about 4 minutes emulated; not in the default suite for time).
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "*** test-aarch64: SKIPPED: $1 ***" >&2; exit 0; }
target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

rustup target list --installed 2>/dev/null | grep -qx $target \
  || rustup target add $target >/dev/null 2>&1 \
  || skip "rustup cannot add $target"
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
    (apt-get install -y -qq $pkgs || { apt-get update -qq && apt-get install -y -qq $pkgs; }) >/dev/null 2>&1 || true
  fi
fi
command -v aarch64-linux-gnu-gcc >/dev/null || skip "no aarch64 cross gcc (apt-get install gcc-aarch64-linux-gnu)"
command -v qemu-aarch64 >/dev/null || skip "no qemu-aarch64 (apt-get install qemu-user)"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
export QEMU_LD_PREFIX=$sysroot
fixtures="--test tiny_text --test tiny_vlm --test kv_types --test masks"
cargo build --quiet --release --target $target -p gemma3-kernels --tests --examples
cargo build --quiet --release --target $target -p gemma3-model $fixtures

# The kernel tests walk every level the (emulated) CPU has, with and without sdot.
for cpu in max cortex-a53; do
  echo "== aarch64 ($cpu): kernel tests"
  QEMU_CPU=$cpu cargo test --quiet --release --target $target -p gemma3-kernels
done
# The model's fixture tests at each level.
for level in "neon" "neon GEMMA3_NO_VNNI=1" "portable"; do
  echo "== aarch64: model fixture tests, GEMMA3_SIMD=$level"
  # shellcheck disable=SC2086
  env GEMMA3_SIMD=$level cargo test --quiet --release --target $target -p gemma3-model $fixtures
done
if [ "${1:-}" = "--real" ]; then
  echo "== aarch64: the real model against transformers (NEON)"
  GEMMA3_SIMD=neon cargo test --quiet --release --target $target -p gemma3-model \
    --test real_270m -- top10_and_greedy_match_transformers
fi

# Bits: x86 natively, aarch64 under qemu.
echo "== aarch64 against x86-64: matrix product bits"
cargo build --quiet --release -p gemma3-kernels --example kernel_bits
mkdir -p target/kernel-bits
target/release/examples/kernel_bits >target/kernel-bits/x86_64.txt
qemu-aarch64 target/$target/release/examples/kernel_bits >target/kernel-bits/aarch64.txt
python3 scripts/kernel-bits-compare.py target/kernel-bits/x86_64.txt target/kernel-bits/aarch64.txt
