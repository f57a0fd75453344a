#!/usr/bin/env bash
# Speculative decoding by prompt lookup (and, given DRAFT, by that draft model) against
# plain decoding, single stream, same model and threads: an input-grounded prompt (repeat
# a ~1K-token document) and one with nothing to copy (a story). Prints decode tokens/s of
# each mode (best of ROUNDS) and the ratios.
#   scripts/bench-lookup.sh [MODEL] [THREADS] [ROUNDS] [DRAFT]
# e.g. the 270M in F32 (gemma3 quantize MODEL f32.gguf F32) drafted by its Q4_K_M file.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-}
threads=${2:-2}
rounds=${3:-3}
draft=${4:-}
bin=target/release/gemma3
[ -x "$bin" ] || cargo build --release -p gemma3-cli >/dev/null
args=(--threads "$threads" -n 256 --verbose --raw)
[ -n "$model" ] && args+=(--model "$model")

doc=$(head -c 4000 ARCHITECTURE.md)
grounded="$doc

The same document, repeated exactly:

$(head -c 200 ARCHITECTURE.md)"
story="Once upon a time, in a village at the edge of a great forest, there lived"

rate() { # prompt, extra flags -> best decode tokens/s; acceptance on stderr
  local best=0 line
  for _ in $(seq "$rounds"); do
    line=$("$bin" generate "${args[@]}" "${@:2}" "$1" 2>&1 >/dev/null | grep -E '^generated|^prompt:|^speculation' | tr '\n' ' ')
    local tps
    tps=$(sed -E 's/.*generated: [0-9]+ tokens, ([0-9.]+) tokens\/s.*/\1/' <<<"$line")
    best=$(python3 -c "print(max($best, $tps))")
    acc=$(grep -oE 'speculation: [^(]*\([0-9]+%\)' <<<"$line" || true)
  done
  echo "$best ${acc:-}"
}

# The story both greedy (the small model soon repeats itself: lookup copies that too) and
# sampled at temperature 1 (nothing to copy: lookup must cost nothing).
for case in "grounded --greedy" "story --greedy" "story --temperature 1 --seed 3"; do
  name=${case%% *}
  extra=()
  [ "$case" != "$name" ] && read -r -a extra <<<"${case#* }"
  prompt=${!name}
  plain=$(rate "$prompt" --no-spec "${extra[@]}")
  spec=$(rate "$prompt" "${extra[@]}")
  p=${plain%% *}
  s=${spec%% *}
  printf '%-32s plain %6.1f tok/s   lookup %6.1f tok/s   %.2fx   %s\n' "$case" "$p" "$s" \
    "$(python3 -c "print($s / $p)")" "${spec#* }"
  if [ -n "$draft" ]; then
    drafted=$(rate "$prompt" --draft "$draft" "${extra[@]}")
    d=${drafted%% *}
    printf '%-32s plain %6.1f tok/s   draft  %6.1f tok/s   %.2fx   %s\n' "$case" "$p" "$d" \
      "$(python3 -c "print($d / $p)")" "${drafted#* }"
  fi
done
