#!/usr/bin/env bash
# The cargo-fuzz targets in fuzz/: `--smoke` runs each for a few seconds (the test command);
# `bash scripts/fuzz.sh SECONDS [TARGET...]` runs longer. On the stable toolchain: cargo-fuzz needs
# nightly flags, which RUSTC_BOOTSTRAP=1 allows. The build is cached under ~/.cache so CI reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:---smoke}
[ "$seconds" = --smoke ] && seconds=${CONFAB_FUZZ_SMOKE_SECONDS:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ws_frame event_payload jwt engineio_packet)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$HOME/.cache/confab-fuzz-target"
scratch="$HOME/.cache/confab-fuzz-corpus"
mkdir -p artifacts/fuzz
# Sanitizer off: the gateway forbids unsafe code, so what a run can find is panics, overflows
# (debug assertions are on) and hangs; address sanitizing every dependency would only slow it.
cargo fuzz build --fuzz-dir fuzz -s none
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${seconds}s"
  mkdir -p "$scratch/$t" "artifacts/fuzz/$t"
  # New inputs go to the scratch corpus (the first directory); the committed seeds are read only.
  cargo fuzz run --fuzz-dir fuzz -s none "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/fuzz/$t/"
done
