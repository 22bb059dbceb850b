#!/usr/bin/env bash
# `make gpu-check`: install the carried wheels (.whl/, from `make gpu-wheels`) into a private folder when there are
# any, then run benchmarks/gpu_check.py from the checkout with the given arguments (--toy: on the CPU, a test).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    site=${DENSEDIFF_WHEEL_SITE:-/tmp/densediff-site}
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
