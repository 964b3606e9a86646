#!/usr/bin/env bash
# Benchmarks: Confab beside a Node Socket.IO peer and a bare tokio-tungstenite broadcaster, one
# invocation (S1–S5, see BENCHMARKS.md). --quick: fewer rate steps; --smoke: seconds, small numbers
# (run by scripts/test.sh so the harness cannot rot). Other arguments go to `confab-bench run`.
# The full run with no other arguments ends by writing its tables into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/confab-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

mode=full
args=()
for a in "$@"; do
  case "$a" in
    --quick) mode=quick ;;
    --smoke) mode=smoke ;;
    *) args+=("$a") ;;
  esac
done

# Postgres (S2) and RabbitMQ (S5), when installed; scenarios that need a missing one say so.
bash scripts/services.sh
if command -v psql >/dev/null && psql -h 127.0.0.1 -U postgres -tAc 'select 1' >/dev/null 2>&1; then
  # Fresh databases every run: results must not depend on what earlier runs left behind.
  for db in confab_bench confab_bench_s5; do
    psql -h 127.0.0.1 -U postgres -qc "drop database if exists $db with (force)" &&
      psql -h 127.0.0.1 -U postgres -qc "create database $db"
  done
fi

echo "== installing the Node peer (npm ci in bench/peers/node)"
# Offline on a fresh machine: better-sqlite3 is compiled from source (no prebuilt-binary fetch)
# against the distribution's Node headers in /usr/include/node (no header download by node-gyp).
if [ -f /usr/include/node/common.gypi ]; then
  export npm_config_nodedir="${npm_config_nodedir:-/usr}"
  export npm_config_build_from_source="${npm_config_build_from_source:-true}"
fi
peer=bench/peers/node
if [ ! -f "$peer/node_modules/.installed" ] || [ "$peer/package-lock.json" -nt "$peer/node_modules/.installed" ]; then
  (cd "$peer" && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed)
fi

# The smoke run uses the debug build the test command already has (the same command: building
# only some packages unifies features differently and would compile the gateway again);
# measurements need release.
profile=release
[ "$mode" = smoke ] && profile=debug
echo "== building ($profile)"
if [ "$profile" = release ]; then
  cargo build --release -p confab-gateway -p confab-bench
else
  cargo build --workspace --bins
fi
bin="$CARGO_TARGET_DIR/$profile"

ulimit -n 20000 2>/dev/null || true
# A failed or interrupted run must not leave an earlier run's results for `confab-bench check`.
rm -f "artifacts/bench/$mode/results.json" "artifacts/bench/$mode/results.md"
echo "== confab-bench run --mode $mode (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
CONFAB_GATEWAY_BIN="$bin/confab-gateway" CONFAB_BARE_BIN="$bin/confab-bare" \
  "$bin/confab-bench" run --mode "$mode" --out "artifacts/bench/$mode" ${args[@]+"${args[@]}"}

# The whole full run is what BENCHMARKS.md shows: its generated part is rewritten from results.json
# (a subset or another mode would replace the full tables with partial ones, so they do not).
if [ "$mode" = full ] && [ ${#args[@]} -eq 0 ]; then
  "$bin/confab-bench" check "artifacts/bench/full/results.json" || echo "!! the full run's results contradict themselves (above); BENCHMARKS.md is updated anyway, check before committing"
  "$bin/confab-bench" report "artifacts/bench/full/results.json" --into BENCHMARKS.md
fi
