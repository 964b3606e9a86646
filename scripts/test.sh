#!/usr/bin/env bash
# The whole test suite, from a fresh machine: starts the local services it needs, installs the
# test clients, builds, then runs the Rust tests and the end-to-end suites with real clients.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/confab-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

bash scripts/services.sh

echo "== installing test clients (npm ci in tests/js)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)

# The S3 attachment store's contract runs against moto's S3 emulator (PyPI `moto[server]`), in the
# venv scripts/test-operator.sh also uses; the test fails (never skips) without it.
VENV="$HOME/.cache/confab-venv"
if [ ! -x "$VENV/bin/moto_server" ]; then
  echo "== installing the S3 emulator (moto[server]) into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[server]==5.*'
fi
export CONFAB_MOTO_SERVER="$VENV/bin/moto_server"

echo "== building"
cargo build --workspace --bins
export CONFAB_GATEWAY_BIN="$CARGO_TARGET_DIR/debug/confab-gateway"

echo "== Rust tests (unit, contract, end-to-end)"
cargo nextest run --workspace --no-fail-fast

# The web page's browser test drives Debian's Chromium; without it that test fails (never skips).
if [ ! -x /usr/bin/chromium ]; then
  echo "== installing chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  fi || echo "!! could not install chromium; tests/js/browser.test.mjs will fail"
fi

echo "== end-to-end with real clients (node --test)"
# The three-gateway suites run on their own: it shares Postgres, Redis and RabbitMQ and its
# outage timings are the most sensitive to a second suite competing for the 2 cores.
node --test --test-concurrency=2 --test-timeout=300000 $(ls tests/js/*.test.mjs | grep -v -e cluster.test.mjs -e drain-fleet.test.mjs)
node --test --test-timeout=300000 tests/js/cluster.test.mjs
# Draining gateways of a busy three-node fleet: reconnect rate per second is measured, so alone,
# and against release gateways (a debug build's own CPU time would be what it measures).
cargo build --release -p confab-gateway -p confab-bench  # as scripts/bench.sh builds it: same features, one build
export CONFAB_GATEWAY_RELEASE_BIN="$CARGO_TARGET_DIR/release/confab-gateway"
node --test --test-timeout=600000 tests/js/drain-fleet.test.mjs

echo "== Autobahn|Testsuite against the /ws WebSocket settings"
bash scripts/autobahn.sh

echo "== fuzz targets: a few seconds each (cargo-fuzz)"
bash scripts/fuzz.sh --smoke

echo "== benchmark harness smoke run"
bash scripts/bench.sh --smoke
"$CARGO_TARGET_DIR/debug/confab-bench" check artifacts/bench/smoke/results.json

if [ -f scripts/test-operator.sh ]; then
  echo "== operator: chart, manifests, binary against an API emulator"
  bash scripts/test-operator.sh
fi
