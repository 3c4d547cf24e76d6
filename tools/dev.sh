#!/usr/bin/env bash
# The project's entry point: sets up a virtual environment, builds and installs lion_ops into
# it, then runs what was asked.
#   bash tools/dev.sh demo     train a small model with Lion and print loss, step time, state bytes
#   bash tools/dev.sh test     the whole test suite (what CI runs)
#   bash tools/dev.sh bench    the benchmark (tools/benchmark.py); extra args are passed on
#   bash tools/dev.sh build    only set up and (re)build
#   bash tools/dev.sh wheels   download into .whl/ the test oracles and peers a GPU machine
#                              (no network) lacks; tools/gpu_check.sh installs them from there
# Environment: LION_OPS_VENV (default .venv), LION_OPS_CUDA (AUTO|ON|OFF, default AUTO),
# LION_OPS_TORCH (default torch==2.14.1, a CUDA build, so the CUDA kernels compile).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${LION_OPS_VENV:-.venv}
torch_req=${LION_OPS_TORCH:-torch==2.14.1}

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
  fi
  local py="$venv/bin/python"
  echo "== installing $torch_req and the build and test tools"
  "$py" -m pip install -q --disable-pip-version-check "$torch_req" "cmake>=3.26" ninja \
    "scikit-build-core>=0.10" pytest expecttest numpy "bitsandbytes>=0.50" lion-pytorch \
    2> >(grep -v "^WARNING: Location" >&2)
  echo "== building lion_ops (LION_OPS_CUDA=${LION_OPS_CUDA:-AUTO})"
  # No build isolation: the library must be built against the torch installed above.
  # A build folder per venv: CMake caches the torch it found, and two venvs with different
  # torch versions must not share one.
  local venv_name
  venv_name=$(basename "$venv")
  "$py" -m pip install -q --disable-pip-version-check --no-build-isolation \
    --config-settings=build-dir="build/${venv_name#.}-{wheel_tag}" . \
    2> >(grep -v "^WARNING: Location" >&2)
}

cmd=${1:-test}
shift || true
case "$cmd" in
  build) setup ;;
  demo) setup; exec "$venv/bin/python" tools/demo.py "$@" ;;
  # `pytest` (not `python -m pytest`) so the installed package, not this source tree, is tested.
  test) setup; exec "$venv/bin/pytest" tests "$@" ;;
  # (timm and matplotlib are left out: timm brings a torchvision that may replace the torch
  # lion_ops was built against; the benchmark reports them missing)
  bench) setup; exec "$venv/bin/python" tools/benchmark.py "$@" ;;
  # Pure-Python wheels (bitsandbytes' carries its CUDA libraries), so any Python 3 takes them;
  # the GPU machines seen so far had torch, timm, matplotlib and pytest already.
  wheels) python3 -m pip download -q --disable-pip-version-check --no-deps -d .whl \
            "bitsandbytes==0.50.2" "expecttest==0.3.0" "lion-pytorch==0.2.5" \
            2> >(grep -v "^WARNING: Location" >&2)
          ls .whl ;;
  *) echo "usage: bash tools/dev.sh {demo|test|bench|build|wheels} [args...]" >&2; exit 2 ;;
esac
