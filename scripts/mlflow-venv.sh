#!/usr/bin/env bash
# Installs the MLflow tracking server the import test runs against, pinned, into a venv in the
# user's cache dir (kept between runs and checkouts, so only the first run on a machine pays for
# the install; FLEETGATE_MLFLOW_VENV puts it elsewhere).
#
#   scripts/mlflow-venv.sh        prints the path of the venv's `mlflow` executable
#
# The end-to-end test of `fleetgate registry import-mlflow` starts `mlflow server` from this
# venv on a free loopback port (FLEETGATE_MLFLOW overrides the executable).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=3.17.2
venv="${FLEETGATE_MLFLOW_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetgate/mlflow-venv}"
stamp="$venv/.installed-$VERSION"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "mlflow==$VERSION" >&2
  touch "$stamp"
  echo "mlflow $VERSION installed into $venv in $(($(date +%s) - start)) s" >&2
fi
echo "$venv/bin/mlflow"
