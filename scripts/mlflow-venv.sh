#!/usr/bin/env bash
# Installs the MLflow tracking server the import test runs against, pinned, into a venv under
# target/ (kept between runs, so only the first run pays for the install).
#
#   scripts/mlflow-venv.sh        prints the path of the venv's `mlflow` executable
#
# The end-to-end test of `fleetgate registry import-mlflow` starts `mlflow server` from this
# venv on a free loopback port (FLEETGATE_MLFLOW overrides the executable).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=3.17.2
venv="${FLEETGATE_MLFLOW_VENV:-$PWD/target/mlflow-venv}"
stamp="$venv/.installed-$VERSION"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "mlflow==$VERSION" >&2
  touch "$stamp"
  echo "mlflow $VERSION installed into $venv in $(($(date +%s) - start)) s" >&2
fi
echo "$venv/bin/mlflow"
