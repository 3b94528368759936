#!/usr/bin/env bash
# The GPU benchmarks in one command, from the repository root of a GPU machine:
#
#   bash benchmarks/gpu.sh                          # install from the package index
#   bash benchmarks/gpu.sh --wheels DIR --quick     # install offline from a folder of wheels (or WHEELS=DIR)
#
# 1. Makes a virtual environment (VENV, default .venv-gpu) that also sees the machine's own packages
#    (--system-site-packages), so a CUDA build of the pinned PyTorch already installed there is used as it
#    is, and installs the project into it (`--no-deps`), then its dependencies and `bench` extra without
#    torch, from the package index or with `pip install --no-index --find-links DIR` from the wheel folder
#    (which then holds the wheels of every dependency: see benchmarks/README.md). DALI is the CUDA 13 build
#    under a CUDA 13 PyTorch, else the default dependency's CUDA 12 build.
# 2. Prints nvidia-smi and the versions, then runs `benchmarks/run.py --device gpu --out OUT` (default
#    OUT=./gpu-bench): DALI `mixed` decoding and the GPU spectrogram against the DALI CPU, torch and raw
#    baselines, the Kinetics-Sound training step under bf16 autocast against the loader, Ray Train, the
#    build. OUT ends up with report.md, report.json, the PNGs, logs/ and gpu.log (all that was printed).
#
# Environment: OUT, VENV, PYTHON (default python3), WHEELS. Other arguments go to benchmarks/run.py
# (--quick, --clips N, --only loader train, --time-limit SECONDS, ...).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu-bench}
VENV=${VENV:-$ROOT/.venv-gpu}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-}
args=()
while (( $# )); do
    case $1 in
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu.log") 2>&1
echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); repository $ROOT; results in $OUT"
nvidia-smi || echo "gpu.sh: nvidia-smi failed"

if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
if [[ -n $WHEELS ]]; then
    [[ -d $WHEELS ]] || { echo "gpu.sh: no wheel folder $WHEELS"; exit 2; }
    source=(--no-index --find-links "$WHEELS")
else
    source=()
fi
# The machine's own CUDA build of PyTorch stays: pyproject.toml pins the release the project is tested with,
# which a GPU image rarely has (and offline cannot get), so the project goes in without its dependencies and
# they follow from pyproject.toml without torch; DALI's build matches torch's CUDA major version.
"$VENV/bin/python" -m pip install -q "${source[@]}" --no-deps --no-build-isolation -e "$ROOT"
mapfile -t deps < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
import torch
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
cuda13 = (torch.version.cuda or "").startswith("13")
for dep in project["dependencies"] + project["optional-dependencies"]["bench"]:
    name = re.split(r"[<>=\[;! ]", dep, maxsplit=1)[0]
    if name == "torch":
        continue
    if name == "nvidia-dali-cuda120" and cuda13:
        dep = dep.replace("cuda120", "cuda130")
    # ray's `default` extra (dashboard) is not needed to train and wants newer aiohttp than GPU images carry
    print(dep.replace("ray[train,default]", "ray[train]"))
PY
)
"$VENV/bin/python" -m pip install -q "${source[@]}" "${deps[@]}"
"$VENV/bin/python" - <<'EOF'
import torch, nvidia.dali, ray
print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} GPU(s); DALI {nvidia.dali.__version__}; Ray {ray.__version__}")
EOF

cd "$ROOT"
PYTHONUNBUFFERED=1 "$VENV/bin/python" benchmarks/run.py --device gpu --out "$OUT" "${args[@]}"
