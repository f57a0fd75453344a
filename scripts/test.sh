#!/usr/bin/env bash
# The whole test suite: fetches the real model when absent, then runs every test of the
# workspace with optimisations (numeric tests are too slow without them).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage says when it starts and how long the suite has run, so a slow stage shows in the log.
phase() { printf '\n== test.sh [%dm%02ds]: %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$1" >&2; }
phase "layers, model, venv"
# The layering: each crate depends only on those below it, no module circles.
python3 scripts/check-layers.py
scripts/fetch-model.sh >/dev/null
# The server's tests drive it with the official openai Python client (and check structured
# output with jsonschema), from a venv; the Python module is built into it by maturin.
venv=target/test-venv
if ! "$venv/bin/python" -c "import openai, jsonschema, numpy, pytest, PIL, maturin" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    openai jsonschema numpy pytest pillow maturin
fi
export GEMMA3_TEST_PYTHON="$PWD/$venv/bin/python"
# The fleet test puts replicas behind HAProxy (Debian's package); it skips loudly without.
if ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq haproxy >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq haproxy; }) >/dev/null 2>&1 \
      || echo "*** haproxy could not be installed: the fleet test will be SKIPPED ***" >&2
  else
    echo "*** haproxy is missing and cannot be installed here: the fleet test will be SKIPPED ***" >&2
  fi
fi
phase "deployment files"
# The deployment files: Kubernetes manifests against its schemas, HAProxy's configuration.
scripts/validate-deploy.sh
phase "cargo test"
cargo test --release --workspace "$@"
phase "python wheel and pytest"
# The Python module: its wheel built, installed into the venv (and into a fresh one by a
# test), then pytest against the fixtures, the CLI and OpenAI's types.
rm -rf target/wheels
"$venv/bin/maturin" build --release --quiet -m crates/python/Cargo.toml -o target/wheels
wheel=$(ls target/wheels/gemma3-*.whl)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
GEMMA3_TEST_MODEL=$(scripts/fetch-model.sh) GEMMA3_BIN="$PWD/target/release/gemma3" \
  GEMMA3_TEST_WHEEL="$PWD/$wheel" "$venv/bin/python" -m pytest -q crates/python/tests
phase "fuzz smoke"
# A short run of every fuzz target over its seeds (builds them on first use).
scripts/fuzz-smoke.sh
phase "windows and macos check"
# The workspace type-checks for Windows and macOS.
scripts/cross-check.sh
phase "aarch64 under qemu"
# The kernels and the model fixtures on aarch64 under qemu, every level forced in turn.
scripts/test-aarch64.sh
phase "all passed"
