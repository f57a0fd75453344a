#!/usr/bin/env bash
# The whole test suite: fetches the real model when absent, then runs every test of the
# workspace with optimisations (numeric tests are too slow without them).
set -euo pipefail
cd "$(dirname "$0")/.."
# The layering: each crate depends only on those below it, no module circles.
python3 scripts/check-layers.py
scripts/fetch-model.sh >/dev/null
# The server's tests drive it with the official openai Python client (and check structured
# output with jsonschema), from a venv.
venv=target/test-venv
if ! "$venv/bin/python" -c "import openai, jsonschema" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check openai jsonschema
fi
export GEMMA3_TEST_PYTHON="$PWD/$venv/bin/python"
cargo test --release --workspace "$@"
# A short run of every fuzz target over its seeds (builds them on first use).
scripts/fuzz-smoke.sh
