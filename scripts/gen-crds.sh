#!/usr/bin/env bash
# Regenerates crds/chatcluster.yaml and its copy in the Helm chart from the operator's code.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/confab-target}"
cargo run --quiet -p confab-operator -- crd > crds/chatcluster.yaml
cp crds/chatcluster.yaml charts/confab-operator/crds/chatcluster.yaml
echo "wrote crds/chatcluster.yaml and charts/confab-operator/crds/chatcluster.yaml"
