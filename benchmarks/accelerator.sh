#!/usr/bin/env bash
# The GPU/TPU part of the benchmarks, for a machine that has a device and jax already (the device
# tool's machines: jax 0.11, no package registry), in at most about 4 minutes on one H100:
#   1. install jaxattn without its dependencies (they cannot be downloaded there);
#   2. the device checks: the Pallas kernels compiled for this device against the XLA kernels;
#   3. benchmarks/accelerator.py: prefill and paged decode beside JAX's own kernels.
# Everything it writes goes to $OUT (the device tool's folder) or benchmarks/results/.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxattn importable even if the editable install cannot be built there
mkdir -p "$out"
stamp="$(date +%F)"
{
  echo "# $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  python -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
  python -c "import flax, optax, orbax.checkpoint" 2>&1 | tail -1 || true
} > "$out/accelerator-$stamp-setup.txt" 2>&1
cat "$out/accelerator-$stamp-setup.txt"

if python -c "import pytest" 2>/dev/null; then
  timeout 100 python -m pytest -q -o addopts="" -p no:cacheprovider tests/accelerator 2>&1 | tee "$out/accelerator-$stamp-tests.txt"
else
  timeout 100 python tests/accelerator/test_on_device.py 2>&1 | tee "$out/accelerator-$stamp-tests.txt"
fi
timeout 140 python -m benchmarks.accelerator --out "$out/accelerator-$stamp.json" 2>&1 | tee "$out/accelerator-$stamp.txt"
echo "wrote $out/accelerator-$stamp*.{txt,json}"
