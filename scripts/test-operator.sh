#!/usr/bin/env bash
# Operator checks beyond cargo: Helm 4 render + lint of the chart, strict Kubernetes 1.37 schema
# validation of every rendered object and builder output, the example ChatCluster against the
# CRD schema, the operator binary against a Kubernetes API emulator (scenarios, and its requests
# against the chart's RBAC) and the Tilt build context (cargo metadata --locked --offline on exactly
# what Tilt sends). Works on a fresh
# machine: it makes (or reuses) a venv with pinned tools and builds the binary if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/confab-target}"
VENV="$HOME/.cache/confab-venv"
REQUIREMENTS=operator/e2e/requirements.txt

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
# Reinstall only when the pins changed since the last successful install.
STAMP="$VENV/.confab-operator-requirements"
if ! cmp -s "$REQUIREMENTS" "$STAMP" 2>/dev/null; then
  echo "== installing pinned Python tools"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  cp "$REQUIREMENTS" "$STAMP"
fi

export CONFAB_OPERATOR_BIN="$CARGO_TARGET_DIR/debug/confab-operator"
# A no-op when scripts/test.sh has just built the workspace; otherwise keeps the binary fresh.
cargo build --quiet -p confab-operator --bin confab-operator

echo "== chart, manifests and operator binary (pytest)"
set +e
(cd operator/e2e && "$VENV/bin/python" -m pytest -q -rA .)
status=$?
set -e
if [ "$status" -eq 0 ]; then
  echo "operator checks: all passed"
else
  echo "operator checks: FAILED (pytest exit $status)"
fi
exit "$status"
