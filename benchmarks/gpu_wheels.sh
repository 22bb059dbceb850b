#!/usr/bin/env bash
# `make gpu-wheels`: the wheels the GPU machine lacks (docs: benchmarks/README.md, "The GPU check"), built here from
# the versions installed in .venv, into .whl/ (ignored by git; the device tool carries it with carry=[".whl"]).
# All are pure Python (py3-none-any), so wheels built here install on the device's Python 3.12. The device already has
# torch (CUDA), lightning, transformers, peft, torchmetrics, safetensors, huggingface-hub, scipy, pillow and numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PACKAGES="diffusers hydra-core omegaconf antlr4-python3-runtime importlib_metadata"
mkdir -p .whl
for package in $PACKAGES; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$package'))")
    "$PY" -m pip wheel -q --no-deps --no-cache-dir -w .whl "$package==$version"
done
ls -l .whl
