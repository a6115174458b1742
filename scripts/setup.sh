#!/usr/bin/env bash
# Set up .venv once (and again when pyproject.toml changes): torch first, then plugformer.
#
# torch is installed on its own first, pinned, so that pip never resolves "torch" to a newer
# build with gigabytes of CUDA packages. To use another build (a CUDA one for your GPUs),
# install it into .venv before running this script, or set PLUGFORMER_TORCH to the pip
# requirement you want, for example PLUGFORMER_TORCH="torch==2.13.0" plus PIP_INDEX_URL
# pointing at the index of your CUDA version. An installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PLUGFORMER_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "plugformer: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.plugformer-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "plugformer: installing ${PLUGFORMER_TORCH:-torch==2.13.0}" >&2
  "$venv/bin/pip" install --quiet "${PLUGFORMER_TORCH:-torch==2.13.0}"
fi
echo "plugformer: installing plugformer and its dependencies into $venv" >&2
"$venv/bin/pip" install --quiet -e ".[dev,test]"
touch "$stamp"
