#!/usr/bin/env bash
# One image end to end, side by side with llama-mtmd-cli (issue 21's image goal): a random
# Gemma 3 4B-shaped checkpoint with a full SigLIP So400m tower (examples/random_checkpoint.rs
# ... vision), written as Q4_K_M + an f16 mmproj by `gemma3 quantize --mmproj`; one 896x896
# PNG; both engines load, encode the image, prefill and make one token at -t THREADS, timed
# whole with their peak RSS. llama.cpp's binaries come from LLAMACPP_BIN (default
# /tmp/llamacpp/build/bin, built by ../shared/tools/build_llamacpp.sh); without them only
# gemma3 runs. Needs ~12 GB free in WORK (default: a temporary directory, deleted at the end).
# Also prints `gemma3 bench --vision` (the tower alone) at the bf16 unit this CPU uses and
# in f32. Run on a quiet machine: timings are wall-clock.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
THREADS=${THREADS:-2}
LLAMACPP_BIN=${LLAMACPP_BIN:-/tmp/llamacpp/build/bin}
trap 'rm -rf "$WORK/ckpt" "$WORK/4b.gguf" "$WORK/mmproj.gguf" "$WORK/image.png"' EXIT
cargo build --release -p gemma3-cli --bin gemma3 && cargo build --release -p gemma3-engine --example random_checkpoint
B=target/release/gemma3
echo "== CPU: $(lscpu | sed -n 's/^Model name: *//p')"
echo "== a random 4B-shaped checkpoint with a vision tower in $WORK/ckpt"
target/release/examples/random_checkpoint "$WORK/ckpt" 4b vision
"$B" quantize -q "$WORK/ckpt" "$WORK/4b.gguf" Q4_K_M --mmproj "$WORK/mmproj.gguf"
rm -rf "$WORK/ckpt"
python3 - "$WORK/image.png" <<'PY'
import struct, sys, zlib
w = h = 896
rows = b"".join(b"\0" + bytes(((x * 7 + y * 3) % 256, (x * y) % 256, (x ^ y) % 256)[i] for x in range(w) for i in range(3)) for y in range(h))
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY
if [ -x "$LLAMACPP_BIN/llama-mtmd-cli" ]; then
  echo "== llama-mtmd-cli -n 1 -t $THREADS -fa off"
  /usr/bin/time -f "llama-mtmd-cli: %e s, peak RSS %M KB" "$LLAMACPP_BIN/llama-mtmd-cli" -m "$WORK/4b.gguf" \
    --mmproj "$WORK/mmproj.gguf" --image "$WORK/image.png" -p 'Describe the image.' -n 1 -t "$THREADS" \
    -fa off --chat-template gemma 2>&1 >/dev/null | grep -E "batch encoding done|llama-mtmd-cli:"
else
  echo "SKIPPED llama-mtmd-cli: no $LLAMACPP_BIN/llama-mtmd-cli (build it with ../shared/tools/build_llamacpp.sh)"
fi
echo "== gemma3 generate -n 1 -t $THREADS"
/usr/bin/time -f "gemma3: %e s, peak RSS %M KB" "$B" generate -m "$WORK/4b.gguf" --mmproj "$WORK/mmproj.gguf" \
  --image "$WORK/image.png" -n 1 -t "$THREADS" --greedy 'Describe the image.' 2>&1 >/dev/null | grep -E "gemma3:"
echo "== the tower alone (gemma3 bench --vision): the default unit, then f32"
"$B" bench --vision -t "$THREADS" -r 1 2>&1 | grep -E "kernels:|So400m"
"$B" bench --vision -t "$THREADS" -r 1 --exact 2>&1 | grep -E "So400m"
