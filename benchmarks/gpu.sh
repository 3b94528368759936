#!/usr/bin/env bash
# The GPU benchmarks on a machine without internet, in one command, in under 10 minutes:
#
#   bash benchmarks/gpu.sh            # from the repository root, with the wheels in ./wheels
#
# 1. Installs what the project needs from wheel files beside it (WHEELS, default ./wheels, subfolders and
#    wheels split into parts included; see benchmarks/README.md for how to prepare and copy them) into a virtual environment that reuses the
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
# Environment: OUT, WORK, WHEELS, PYTHON (default python3), VENV (default /tmp/ume-mma-gpu-venv), BUDGET.
# Extra arguments go to benchmarks/run.py (e.g. --quick, --clips 256, --only loader train).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${OUT:-$PWD/gpu-bench}" && cd "${OUT:-$PWD/gpu-bench}" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/ume-mma-gpu-bench}
WHEELS=${WHEELS:-$ROOT/wheels}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/ume-mma-gpu-venv}
BUDGET=${BUDGET:-570}

exec > >(tee "$OUT/gpu.log") 2>&1

finish() {
    local rc=$?
    if [[ -d $WORK ]]; then
        for f in report.md report.json build.png loader.png train.png; do
            if [[ -f $WORK/$f ]]; then cp "$WORK/$f" "$OUT/"; fi
        done
        (cd "$WORK" && tar -czf "$OUT/details.tar.gz" --ignore-failed-read logs \
            build/build.json loader/loader.json train/train.json 2>/dev/null) || true
    fi
    echo "gpu.sh: exit code $rc after ${SECONDS} s; results in $OUT"
}
trap finish EXIT

echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); repository $ROOT; wheels $WHEELS; work $WORK"
nvidia-smi || echo "gpu.sh: nvidia-smi failed"

if [[ ! -d $WHEELS ]]; then
    echo "gpu.sh: no wheel folder $WHEELS; prepare one as benchmarks/README.md says, or set WHEELS"
    exit 2
fi
# Wheels may come in bundle folders (wheels/01, wheels/02, ...) and the big ones in parts (split -b 60M, see
# benchmarks/README.md): parts are joined into WHEELS by name order and checked against WHEELS/SHA256SUMS.
while IFS= read -r name; do
    if [[ ! -f $WHEELS/$name ]]; then
        echo "gpu.sh: joining $name from its parts"
        find "$WHEELS" -name "$name.part-*" -printf '%f\t%p\n' | sort | cut -f2 | xargs cat > "$WHEELS/$name.tmp"
        mv "$WHEELS/$name.tmp" "$WHEELS/$name"
    fi
done < <(find "$WHEELS" -name '*.whl.part-*' -printf '%f\n' | sed 's/\.part-[a-z]*$//' | sort -u)
if [[ -f $WHEELS/SHA256SUMS ]]; then
    (cd "$WHEELS" && sha256sum --check --quiet SHA256SUMS)
fi
find_links=()
while IFS= read -r dir; do find_links+=(--find-links "$dir"); done < <(find "$WHEELS" -type d)

if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
    # When PYTHON is itself a venv (e.g. the image's /opt/torch/.venv), --system-site-packages only reaches
    # the base interpreter; a .pth file adds PYTHON's own site-packages, where torch lives.
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_base_site_packages.pth"
fi
VPY=$VENV/bin/python
pip_install() { "$VPY" -m pip install -q --no-index "${find_links[@]}" --no-cache-dir --disable-pip-version-check "$@"; }

if ! pip_install nvidia-dali-cuda130; then
    echo "gpu.sh: no usable nvidia-dali-cuda130 wheel set; trying nvidia-dali-cuda120"
    pip_install nvidia-dali-cuda120
fi
mapfile -t deps < <("$VPY" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if not dep.startswith(("torch", "nvidia-dali")):  # the machine's own torch; DALI is installed above
        print(dep)
EOF
)
pip_install "${deps[@]}"
if ! command -v ffmpeg >/dev/null; then
    pip_install imageio-ffmpeg  # a static ffmpeg (with libx264) for benchmarks/corpus.py
fi
if ! "$VPY" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check -q -e "$ROOT"; then
    echo "gpu.sh: the editable install failed; importing the project from $ROOT through PYTHONPATH"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
"$VPY" -m pip list --disable-pip-version-check 2>/dev/null | grep -i -E '^(torch|nvidia-dali|ray|av|decord|webdataset|numpy|imageio-ffmpeg) ' || true
"$VPY" - <<'EOF'
import torch, nvidia.dali, ray
print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} GPU(s); DALI {nvidia.dali.__version__}; Ray {ray.__version__}")
EOF

cd "$ROOT"
left=$((BUDGET - SECONDS))
echo "gpu.sh: set-up took ${SECONDS} s; benchmarks get ${left} s"
PYTHONUNBUFFERED=1 "$VPY" benchmarks/run.py --device gpu --out "$WORK" --time-limit "$left" "$@"
