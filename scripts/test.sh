#!/usr/bin/env bash
# The whole test suite: fetches the real model when absent, then runs every test of the
# workspace with optimisations (numeric tests are too slow without them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
cargo test --release --workspace "$@"
