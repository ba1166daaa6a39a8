#!/usr/bin/env bash
# GPU check on a borrowed GPU machine (no TensorFlow, no Keras, no internet): installs the wheels carried in
# .whl/ when Keras is missing, prints the GPU, then runs benchmarks/gpu_check.py (KERAS_BACKEND=jax unless
# set; torch works too). Arguments go to gpu_check.py (--quick: tiny sizes, to test it on a CPU).
# benchmarks/README.md says how to fetch the wheels and run it through the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if ! python3 -c "import keras, imagehash" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: Keras (or ImageHash) is missing here and no wheels are in .whl/ (see benchmarks/README.md)" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "python: $(command -v python3) ($(python3 -c 'import platform; print(platform.python_version())'))"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || true
else
  echo "nvidia-smi: not here (no NVIDIA GPU)"
fi
echo "KERAS_BACKEND=$KERAS_BACKEND"

# The whole check must stay well inside one device call: the Python part skips what would start after
# --budget-s (default 200 s) and writes its JSON after every section; this stops it at 280 s regardless.
exec timeout "${BCD_GPU_CHECK_TIMEOUT:-280}" python3 benchmarks/gpu_check.py "$@"
