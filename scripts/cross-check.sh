#!/usr/bin/env bash
# `cargo check` of the whole workspace for Windows (x86_64-pc-windows-gnu) and macOS
# (aarch64-apple-darwin), so that code that only builds on Linux cannot land unseen. C code
# in dependencies (ring) needs a compiler for the target: Debian's mingw-w64 for Windows,
# `zig cc` from PyPI's ziglang for macOS (the target flags cc-rs adds are dropped, as
# cargo-zigbuild does). What cannot be had is skipped loudly, never silently passed.
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "*** cross-check: SKIPPED $1 ***" >&2; }
have_target() { rustup target list --installed 2>/dev/null | grep -qx "$1" || rustup target add "$1" >/dev/null 2>&1; }
# The workspace checked for target $1, warnings as errors. --release: the host's build
# scripts and proc macros are then those the suite's release build made already, so only
# the target's own crates are checked (half the time).
check() {
  RUSTFLAGS="-D warnings" cargo check --quiet --release --workspace --target "$1"
  echo "ok: cargo check for $1"
}

# Windows
if have_target x86_64-pc-windows-gnu; then
  if ! command -v x86_64-w64-mingw32-gcc >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq gcc-mingw-w64-x86-64 >/dev/null 2>&1 || true
  fi
  if command -v x86_64-w64-mingw32-gcc >/dev/null; then
    check x86_64-pc-windows-gnu
  else
    skip "Windows: no mingw-w64 C compiler (apt-get install gcc-mingw-w64-x86-64)"
  fi
else
  skip "Windows: rustup cannot add x86_64-pc-windows-gnu"
fi

# macOS
if have_target aarch64-apple-darwin; then
  python3 -c "import ziglang" 2>/dev/null || python3 -m pip install --quiet ziglang >/dev/null 2>&1 || true
  if python3 -c "import ziglang" 2>/dev/null; then
    mkdir -p target
    cc=target/zig-cc-macos.sh
    cat >"$cc" <<'EOF'
#!/bin/sh
# zig cc for aarch64-macos; the target flags cc-rs adds are dropped.
args=""
for a in "$@"; do
  case "$a" in
    --target=*|-arch|arm64|-mmacosx-version-min=*) ;;
    *) args="$args '$a'" ;;
  esac
done
eval exec python3 -m ziglang cc -target aarch64-macos $args
EOF
    chmod +x "$cc"
    CC_aarch64_apple_darwin="$PWD/$cc" AR_aarch64_apple_darwin="python3 -m ziglang ar" \
      check aarch64-apple-darwin
  else
    skip "macOS: no zig (pip install ziglang)"
  fi
else
  skip "macOS: rustup cannot add aarch64-apple-darwin"
fi
