#!/usr/bin/env bash
# Short run of every fuzz target (fuzz/fuzz_targets/*) over its seed corpus (fuzz/seeds/*):
# a regression in any parser of untrusted bytes (a panic, a timeout, runaway memory) fails
# the test suite. Builds all targets in one cargo invocation (fuzz/target is kept, so later
# runs are incremental). Long campaigns: see README.md, "Fuzzing".
#   FUZZ_SECONDS   seconds per target (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-5}"

warn() { printf '\n%s\n%s\n%s\n\n' "!!!!!!!!!!!!!!!!!!!!" "fuzz-smoke: $*" "!!!!!!!!!!!!!!!!!!!!" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: cargo-fuzz is missing, installing it" >&2
  if ! cargo install cargo-fuzz --locked >&2; then
    warn "SKIPPED: cargo-fuzz is not installed and could not be installed; the fuzz targets did not run"
    exit 0
  fi
fi

# Stable toolchain: cargo-fuzz needs -Z flags, which RUSTC_BOOTSTRAP allows. No sanitizer:
# the targets run safe Rust, and overflow checks and debug assertions turn silent arithmetic
# errors into findings. The dev profile (fuzz/Cargo.toml: opt-level 1) builds in two thirds
# of the release profile's time; a smoke run over the seeds needs no more speed than that.
export RUSTC_BOOTSTRAP=1
cargo fuzz build --dev --sanitizer none
bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/debug"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for src in fuzz/fuzz_targets/*.rs; do
  t="$(basename "$src" .rs)"
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  # New inputs go to the scratch corpus; the committed seeds are only read.
  if "$bin/$t" "$work/$t/corpus" "fuzz/seeds/$t" -max_total_time="$seconds" \
      -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$work/$t/artifacts/" \
      >"$work/$t/log" 2>&1; then
    echo "fuzz-smoke: $t: $(grep -o '#[0-9]*.*DONE.*' "$work/$t/log" | tail -1)"
  else
    failed+=("$t")
    tail -40 "$work/$t/log" >&2
    mkdir -p fuzz/artifacts/"$t"
    cp "$work/$t/artifacts/"* fuzz/artifacts/"$t"/ 2>/dev/null || true
    echo "fuzz-smoke: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
  fi
done
if ((${#failed[@]})); then
  echo "fuzz-smoke: findings in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz-smoke: all targets ran ${seconds}s without a finding"
