#!/usr/bin/env bash
# The wheels a bare CUDA PyTorch image lacks for this project, into .whl/ (for a GPU machine that
# cannot reach PyPI): run here, where pip works, from the checkout, with the project's environment
# (make env) active or as .venv. Versions are the ones this checkout is tested with.
#
# The image (this workplace's 'cuda' one: python 3.12, torch, timm, numpy, pillow, scipy, scikit-learn,
# safetensors, tqdm, PyYAML, ...) lacks torchtitan and what it imports (tyro and its parsers, spmd_types,
# dill), torchao, omegaconf, webdataset (braceexpand), zstandard and submitit; timm travels too so that
# its version is this checkout's. wandb stays behind: nothing imports it unless log.wandb is on.
#
# On the GPU machine, from the checkout with .whl/ beside it (under 9 minutes in all):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --budget-s 480 --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAMES="torchtitan torchao timm tyro docstring_parser typeguard spmd_types dill omegaconf webdataset braceexpand zstandard submitit"
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for name in $NAMES; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl .   # the project: its metadata (version)
rm -rf build
ls -1 .whl && du -sh .whl
