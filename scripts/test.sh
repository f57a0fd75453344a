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
# The fleet test puts replicas behind HAProxy (Debian's package); it skips loudly without.
if ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq haproxy >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq haproxy; }) >/dev/null 2>&1 \
      || echo "*** haproxy could not be installed: the fleet test will be SKIPPED ***" >&2
  else
    echo "*** haproxy is missing and cannot be installed here: the fleet test will be SKIPPED ***" >&2
  fi
fi
# The deployment files: Kubernetes manifests against its schemas, HAProxy's configuration.
scripts/validate-deploy.sh
cargo test --release --workspace "$@"
# A short run of every fuzz target over its seeds (builds them on first use).
scripts/fuzz-smoke.sh
# The workspace type-checks for Windows and macOS.
scripts/cross-check.sh
