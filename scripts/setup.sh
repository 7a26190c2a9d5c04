#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (created if missing).
#   bash scripts/setup.sh            backend + CLI + extraction extras
#   bash scripts/setup.sh --test     ... plus the test suite's needs (bpy 5.0.1, libigl, pytest, and the
#                                    scans extra: laspy/lazrs, pye57, pypcd4 for LAS/LAZ, E57, PCD files)
#   bash scripts/setup.sh --bench    ... plus the benchmarks' needs (Open3D)
# torch: the pinned CPU build is installed first, unless the venv already has a torch (a GPU user's
# own CUDA build is left alone). Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0+cu126".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="mesh"
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test,training,foreground,scans" ;;
    --bench) extras="$extras,test,training,foreground,scans,bench" ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
if [[ "$extras" == *bench* ]] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
   && ! ldconfig -p | grep -q libusb-1.0; then
  # Open3D's wheel links against libusb.
  apt-get install -y -qq libusb-1.0-0 >/dev/null || echo "setup.sh: could not install libusb-1.0-0 (Open3D needs it)" >&2
fi
echo "setup.sh: ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))" >&2
