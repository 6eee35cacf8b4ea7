#!/usr/bin/env bash
# Set up (or re-use) the cpd_mm development environment in <repo>/.venv.
#
# Idempotent: every step first checks whether its result already works and skips
# itself if so.  The slow step, building mmcv 2.1.0 with its compiled ops (~15 min
# on two cores), is done once per machine: the wheel is cached in
# ${CPD_MM_CACHE:-~/.cache/cpd_mm}/wheels and re-used by later set-ups.
#
# Environment knobs:
#   CPD_MM_VENV     path of the virtual environment   (default: <repo>/.venv)
#   CPD_MM_CACHE    wheel cache directory              (default: ~/.cache/cpd_mm)
#   CPD_MM_PYTHON   interpreter that creates the venv  (default: python3)
#   CPD_MM_USE_SYSTEM=1  use the current interpreter instead of a venv (keeps a
#                   user's own CUDA torch / mmcv when they already import fine)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CPD_MM_VENV:-$ROOT/.venv}"
CACHE="${CPD_MM_CACHE:-$HOME/.cache/cpd_mm}"
PY_BOOT="${CPD_MM_PYTHON:-python3}"
TORCH_VER=2.14.1
TV_VER=0.29.1
MMCV_VER=2.1.0

say()  { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
fail() { printf '\033[31m[setup] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }
trap 'fail "step failed at line $LINENO (command: $BASH_COMMAND)"' ERR

START=$(date +%s)

# 1. interpreter / virtual environment ---------------------------------------
if [[ "${CPD_MM_USE_SYSTEM:-0}" == "1" ]]; then
  PY="$(command -v python3)"
  say "using the current interpreter $PY (CPD_MM_USE_SYSTEM=1)"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV"
    "$PY_BOOT" -m venv "$VENV" || fail "could not create a venv with $PY_BOOT"
  else
    say "virtual environment $VENV exists"
  fi
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade 'pip>=23' wheel 'setuptools<81' >/dev/null \
  || fail "could not install pip/wheel/setuptools<81"

# 2. torch + torchvision -----------------------------------------------------
if "$PY" - <<'PY' 2>/dev/null; then
import torch, torchvision
torch.ones(1) + 1
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
PY
  say "torch $("$PY" -c 'import torch;print(torch.__version__)') and torchvision already work: keeping them"
else
  say "installing torch==$TORCH_VER torchvision==$TV_VER"
  # (this machine's pip config lists local indexes that warn on every
  # package; keep the log readable)
  "${PIP[@]}" install -q "torch==$TORCH_VER" "torchvision==$TV_VER" 2>&1 \
    | grep -v 'is ignored: it is neither' || true
  "$PY" -c 'import torch, torchvision' \
    || fail "torch/torchvision install failed"
fi

# 3. mmcv with compiled ops ---------------------------------------------------
mmcv_ok() {
  "$PY" - <<'PY' 2>/dev/null
import mmcv, torch
from mmcv.ops import nms  # needs the compiled extension
assert mmcv.__version__.startswith(('2.0', '2.1')), mmcv.__version__
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
PY
}
if mmcv_ok; then
  say "mmcv $("$PY" -c 'import mmcv;print(mmcv.__version__)') with compiled ops already works: keeping it"
else
  # The wheel is tied to the interpreter, the torch ABI and whether CUDA ops were built.
  TAG="$("$PY" -c "import sys,torch; ops='cuda' if (torch.cuda.is_available() or '${FORCE_CUDA:-0}'=='1') else 'cpu'; print('py%d%d-torch%s-%sops' % (sys.version_info[0], sys.version_info[1], torch.__version__.split('+')[0], ops))")"
  WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VER-$TAG"
  mkdir -p "$WHEEL_DIR"
  WHEEL="$(ls "$WHEEL_DIR"/mmcv-$MMCV_VER-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$WHEEL" ]]; then
    say "building mmcv $MMCV_VER with compiled ops (once per machine, ~15 min on 2 cores)"
    "${PIP[@]}" install -q 'setuptools<81' ninja psutil packaging addict yapf opencv-python mmengine \
      || fail "could not install mmcv build requirements"
    BUILD="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VER" -d "$BUILD" \
      || fail "could not download the mmcv $MMCV_VER source archive from PyPI"
    tar -xzf "$BUILD"/mmcv-$MMCV_VER.tar.gz -C "$BUILD"
    SRC="$BUILD/mmcv-$MMCV_VER"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    grep -q 'c++20' "$SRC/setup.py" || fail "could not patch the C++ standard flag in mmcv's setup.py"
    (cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
       "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" . ) \
      || fail "mmcv build failed (see the compiler output above)"
    rm -rf "$BUILD"
    WHEEL="$(ls "$WHEEL_DIR"/mmcv-$MMCV_VER-*.whl | head -n1)"
    say "cached $WHEEL"
  else
    say "re-using cached mmcv wheel $WHEEL"
  fi
  "${PIP[@]}" install -q --no-deps "$WHEEL" || fail "could not install $WHEEL"
  "${PIP[@]}" install -q addict yapf opencv-python packaging mmengine pyyaml regex || true
  mmcv_ok || fail "mmcv installed from $WHEEL but mmcv.ops does not import"
fi

# 4. cpd_mm itself ------------------------------------------------------------
say "installing cpd_mm (editable) with its test extras and MMDetection"
"${PIP[@]}" install -q -e "$ROOT[tests]" || fail "pip install -e .[tests] failed"
# (MMDetection comes with cpd_mm's requirements; it names no mmcv or torch,
# so pip keeps the ones installed above)
"$PY" -c 'import cpd_mm, mmpretrain, mmseg, mmdet; print("cpd_mm", cpd_mm.__version__, "| mmpretrain", mmpretrain.__version__, "| mmseg", mmseg.__version__, "| mmdet", mmdet.__version__)' \
  || fail "cpd_mm installed but does not import"

say "done in $(( $(date +%s) - START )) s; interpreter: $PY"
