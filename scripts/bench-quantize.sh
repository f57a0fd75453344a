#!/usr/bin/env bash
# Quantization benchmark (issue 9's goals): builds a random-weight bf16 checkpoint of Gemma 3
# 4B's shape (~7.8 GB), times `gemma3 quantize DIR out.gguf Q4_K_M` with its peak RSS, and
# the load time of `--quantize Q4_K_M` from bf16 for the quantize fixture's hf/ and the 4B
# shape. Needs ~11 GB of free disk in WORK (default: a temporary directory); everything it
# writes there is deleted at the end. Run on a quiet machine: timings are wall-clock.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
SIZE=${SIZE:-4b}
trap 'rm -rf "$WORK/ckpt" "$WORK/out.gguf"' EXIT
cargo build --release -p gemma3-cli -p gemma3-engine --example random_checkpoint
B=target/release/gemma3
echo "== generating a random $SIZE bf16 checkpoint in $WORK/ckpt"
target/release/examples/random_checkpoint "$WORK/ckpt" "$SIZE"
du -sh "$WORK/ckpt"
echo "== gemma3 quantize (bf16 -> Q4_K_M)"
/usr/bin/time -v "$B" quantize "$WORK/ckpt" "$WORK/out.gguf" Q4_K_M 2>&1 \
  | grep -E "tensors in|wrote|Elapsed|Maximum resident"
echo "== --quantize Q4_K_M at load (gemma3 info), fixture hf/"
/usr/bin/time -f "load: %e s, peak RSS %M KB" "$B" info -m ../shared/fixtures/quantize/hf --quantize Q4_K_M 2>&1 \
  | grep -E "load:|Q4_K|Q6_K"
echo "== --quantize Q4_K_M at load (gemma3 info), $SIZE shape"
/usr/bin/time -f "load: %e s, peak RSS %M KB" "$B" info -m "$WORK/ckpt" --quantize Q4_K_M 2>&1 \
  | grep -E "load:|Q4_K|Q6_K"
