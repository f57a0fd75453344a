#!/bin/sh
# The image's entry point: optionally pulls a model into $HF_HOME, then becomes
# `gemma3 serve` (exec, so the server itself receives SIGTERM and drains).
#
#   GEMMA3_PULL   a Hugging Face repo id to download first, e.g.
#                 ggml-org/gemma-3-4b-it-GGUF:Q4_K_M (files already in the cache are
#                 not downloaded again)
#   GEMMA3_HOST   address to listen on [default: 0.0.0.0, every interface]
#
# Every argument goes to `gemma3 serve`; the model can also come from GEMMA3_MODEL.
set -eu

if [ -n "${GEMMA3_PULL:-}" ]; then
    echo "gemma3-entrypoint: pulling $GEMMA3_PULL" >&2
    # pull prints the file's path on stdout; keep the log to stderr.
    gemma3 pull "$GEMMA3_PULL" >&2
fi

exec gemma3 serve --host "${GEMMA3_HOST:-0.0.0.0}" "$@"
