#!/usr/bin/env bash
# The GPU benchmarks on a machine without internet, in one command, in under 10 minutes:
#
#   bash benchmarks/gpu.sh            # from the repository root, with the wheels in ./wheels
#
# 1. Installs what the project needs from wheel files beside it (WHEELS, default ./wheels: plain wheels, wheels
#    split into parts, or the numbered part folders of `benchmarks/pack.py prepare`, which pack.py joins and
#    checks; see benchmarks/README.md) into a virtual environment that reuses the
#    machine's own PyTorch (--system-site-packages, plus the site-packages of PYTHON when that is itself a
#    venv): nvidia-dali-cuda130 (else -cuda120), then the project's other dependencies except torch, and the
#    project itself (editable, no dependencies), and imageio-ffmpeg when there is no ffmpeg on PATH.
# 2. Prints nvidia-smi and the versions, then runs `benchmarks/run.py --device gpu` (DALI `mixed` decode and
#    GPU spectrograms against the DALI CPU, torch and raw baselines in the same run; the Kinetics-Sound
#    training step under bf16 autocast against the loader; the data-wait fraction; Ray Train; the build)
#    with a time limit that keeps the whole script under BUDGET seconds (default 570).
# 3. Writes to OUT (default ./gpu-bench), at most 8 files: gpu.log (everything printed, always written),
#    report.md, report.json, build.png, loader.png, train.png and details.tar.gz (per-benchmark JSON and
#    logs). Scratch (corpus, shards, Ray runs) goes to WORK (default /tmp/ume-mma-gpu-bench).
#
# Environment: OUT, WORK, WHEELS, PYTHON (default python3), VENV (default /tmp/ume-mma-gpu-venv), BUDGET,
# DEVICE (default gpu; DEVICE=cpu rehearses the whole script on a machine without a GPU).
# Extra arguments go to benchmarks/run.py (e.g. --quick, --clips 256, --only loader train).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${OUT:-$PWD/gpu-bench}" && cd "${OUT:-$PWD/gpu-bench}" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/ume-mma-gpu-bench}
WHEELS=${WHEELS:-$ROOT/wheels}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/ume-mma-gpu-venv}
BUDGET=${BUDGET:-570}
DEVICE=${DEVICE:-gpu}

exec > >(tee "$OUT/gpu.log") 2>&1

REPORT_FILES=(report.md report.json build.png loader.png train.png)  # run.py writes them into WORK
DETAILS=(build/build.json loader/loader.json train/train.json)

finish() {
    local rc=$?
    if [[ -d $WORK ]]; then
        for f in "${REPORT_FILES[@]}"; do
            if [[ -f $WORK/$f ]]; then cp "$WORK/$f" "$OUT/"; fi
        done
        (cd "$WORK" && tar -czf "$OUT/details.tar.gz" --ignore-failed-read logs "${DETAILS[@]}" 2>/dev/null) || true
    fi
    echo "gpu.sh: exit code $rc after ${SECONDS} s; results in $OUT"
}
trap finish EXIT
trap 'echo "gpu.sh: interrupted"; exit 130' INT
trap 'echo "gpu.sh: terminated"; exit 143' TERM

echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); repository $ROOT; wheels $WHEELS; work $WORK"
# A report left in WORK by an earlier run must not pass for this run's (the corpus and shards are kept).
(cd "$WORK" 2>/dev/null && rm -rf "${REPORT_FILES[@]}" "${DETAILS[@]}" logs) || true
nvidia-smi || echo "gpu.sh: nvidia-smi failed"

# Wheels may come as plain wheels, as wheels split with `split`, or as the parts of benchmarks/pack.py (numbered
# folders, xz-packed); pack.py joins and checks them (against any SHA256SUMS) into $WORK/wheels.
"$PYTHON" "$ROOT/benchmarks/pack.py" unpack "$WHEELS" "$WORK/wheels"
find_links=(--find-links "$WORK/wheels")

if [[ -x $VENV/bin/python && "$(cat "$VENV/.made-from" 2>/dev/null)" != "$PYTHON" ]]; then
    echo "gpu.sh: $VENV was made from another Python; making it again"
    rm -rf "$VENV"
fi
if [[ ! -x $VENV/bin/python ]]; then
    # No pip of its own (ensurepip is missing on some images; the machine's pip is reached below).
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    echo "$PYTHON" > "$VENV/.made-from"
fi
# When PYTHON is itself a venv (e.g. an image's /opt/torch/.venv), --system-site-packages only reaches the base
# interpreter; a .pth file adds PYTHON's own site-packages, where torch and pip live (rewritten every run).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_base_site_packages.pth"
VPY=$VENV/bin/python
if ! "$VPY" -m pip --version >/dev/null 2>&1; then
    echo "gpu.sh: $PYTHON has no pip; installing one into $VENV with ensurepip"
    "$VPY" -m ensurepip --default-pip
fi
if ! "$VPY" -c 'import torch'; then
    echo "gpu.sh: $PYTHON has no PyTorch; set PYTHON to the interpreter that has it"
    exit 2
fi
pip_install() {
    "$VPY" -m pip install -q --no-index "${find_links[@]}" --no-cache-dir --disable-pip-version-check "$@"
}

dali_version=$("$VPY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(re.sub(r"^nvidia-dali-cuda\d+==", "", d) for d in deps if d.startswith("nvidia-dali-cuda")))
EOF
)
if ! pip_install "nvidia-dali-cuda130==$dali_version"; then
    echo "gpu.sh: no usable nvidia-dali-cuda130==$dali_version wheel set; trying nvidia-dali-cuda120"
    pip_install "nvidia-dali-cuda120==$dali_version"
fi
deps_text=$("$VPY" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if not dep.startswith(("torch", "nvidia-dali")):  # the machine's own torch; DALI is installed above
        print(dep)
EOF
)
[[ -n $deps_text ]] || { echo "gpu.sh: no dependencies read from $ROOT/pyproject.toml"; exit 2; }
mapfile -t deps <<< "$deps_text"
pip_install "${deps[@]}"
if ! command -v ffmpeg >/dev/null; then
    pip_install imageio-ffmpeg  # a static ffmpeg (with libx264) for benchmarks/corpus.py
fi
if ! "$VPY" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check -q -e "$ROOT"; then
    echo "gpu.sh: the editable install failed; importing the project from $ROOT through PYTHONPATH"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
"$VPY" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -i -E '^(torch|nvidia-dali|ray|av|decord|webdataset|numpy|imageio-ffmpeg) ' || true
"$VPY" - <<'EOF'
import torch, nvidia.dali, ray
print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} GPU(s); DALI {nvidia.dali.__version__}; Ray {ray.__version__}")
EOF

cd "$ROOT"
left=$((BUDGET - SECONDS))
if (( left < 60 )); then
    echo "gpu.sh: set-up took ${SECONDS} s of BUDGET=${BUDGET}; less than a minute is left for the benchmarks"
    exit 2
fi
echo "gpu.sh: set-up took ${SECONDS} s; benchmarks get ${left} s"
# run.py stops a benchmark still running at its time limit and writes the report; timeout is the backstop.
PYTHONUNBUFFERED=1 timeout -k 10 $((left + 20)) \
    "$VPY" benchmarks/run.py --device "$DEVICE" --out "$WORK" --time-limit "$left" "$@"
