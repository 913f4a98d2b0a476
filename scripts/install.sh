#!/bin/sh
# Install lesionlapse into a virtual environment: scripts/install.sh VENV_DIR [EXTRAS]
# The Makefile (make demo / make test) and the Dockerfile both install through this script, so
# the image is built with the commands CI exercises.
set -eu
venv=${1:?usage: scripts/install.sh VENV_DIR [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.2"
if [ -n "$extras" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[$extras]"
else
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$here"
fi
