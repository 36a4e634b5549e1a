#!/usr/bin/env bash
# One GPU session, everything in one call (a lent GPU machine is billed from start to give-back):
#   1. the GPU benchmark (issue 6): `benchmarks/run.py --gpu` -> GPU_RESULTS.md / gpu_results.json (BENCH=1 runs it)
#   1b. the MFU sweep (issue 6): `benchmarks/gpu.py --mfu-sweep` -> mfu_sweep.json / .md (MFU_SWEEP=1 runs it)
#   1c. the time budget on a GPU (issue 25): a 2-fold `medvox cv --recipe auto --gpu --amp --time-budget` on the
#      64^3 data; prints the forecast against the measured time and the precision run_info records (BUDGET_CV=1)
#   2. the accuracy sweep (issue 8): `benchmarks/accuracy.py run` of many recipes in parallel on the one GPU,
#      stopped at the session's time limit; the small files of every finished run -> acc.tar.gz (SWEEP=0 skips it)
# Usage (repository root, on the GPU machine): OUT=/some/dir BUDGET_S=540 bash benchmarks/gpu_session.sh
# Knobs (defaults: the accuracy sweep alone): BENCH=1 runs 1, MFU_SWEEP=1 runs 1b, BUDGET_CV=1 runs 1c,
# JOBS="..." and PARALLEL=N choose the sweep, FOLD_PARALLEL=0 runs each job's folds in turn in one process,
# MPS=0 does not try CUDA MPS (tried by default, off again if a client cannot start).
# Needs the MedMNIST files in .gpu/data/ and, where the machine lacks them, wheels of MONAI, nibabel and
# pydicom in .whl/ (see benchmarks/NOTES.md).
set -u
OUT=${OUT:-/tmp/medvox-gpu}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
exec > >(tee "$OUT/session.log") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD/src:$PWD" MEDVOX_MEDMNIST_DIR="$PWD/.gpu/data" \
  PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, monai, medvox; from medvox.engine.setup import fabric_module as f; print('torch', torch.__version__,
'monai', monai.__version__, 'lightning', f().__version__, torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())" || exit 1
# the runs and the cache on tmpfs where it has room: every fold writes its best checkpoints (with their
# .safetensors twins, ~0.5 GB for a ResNet-18) at each improving epoch, a dozen folds at a time
SCRATCH=/tmp
if [ "$(df -k --output=avail /dev/shm 2>/dev/null | tail -n 1)" -gt 40000000 ] 2>/dev/null; then SCRATCH=/dev/shm; fi
export MEDVOX_CACHE=$SCRATCH/mvcache
echo "scratch: $SCRATCH"
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
  # CUDA MPS: the kernels of many small training processes run side by side instead of in turns
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 40 python3 -c "import torch; print('MPS client ok', float(torch.ones(4, device='cuda').sum()))"; then
    echo "[$(elapsed) s] MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2> /dev/null; sleep 2
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "[$(elapsed) s] MPS failed, off"
  fi
fi
if [ "${BENCH:-0}" = 1 ]; then  # measured 2026-11-25 (RESULTS_GPU.md); 200 s of a 15-minute lease
  echo "[$(elapsed) s] GPU benchmark"
  timeout 200 python3 benchmarks/run.py --gpu --npz .gpu/data/adrenalmnist3d_64.npz --out "$OUT/GPU_RESULTS.md" \
    --json "$OUT/gpu_results.json" > "$OUT/bench.log" 2>&1
  echo "[$(elapsed) s] benchmark exit $?"; tail -n 25 "$OUT/bench.log"
fi
if [ "${MFU_SWEEP:-0}" = 1 ]; then  # issue 6: which lever moves ResNet-50-3D's MFU (batch, compile, layout)
  echo "[$(elapsed) s] MFU sweep"
  timeout 240 python3 benchmarks/gpu.py --mfu-sweep --json "$OUT/mfu_sweep.json" > "$OUT/mfu.log" 2>&1
  echo "[$(elapsed) s] MFU sweep exit $?"; tail -n 40 "$OUT/mfu.log"
fi
if [ "${BUDGET_CV:-0}" = 1 ]; then
  echo "[$(elapsed) s] time budget on the GPU: medvox cv --recipe auto, 2 folds, ${CV_BUDGET_MIN:-2} min"
  rm -rf "$SCRATCH/budget_cv"
  start=$(date +%s.%N)
  timeout 300 python3 -m medvox cv --data .gpu/data/adrenalmnist3d_64.npz --recipe auto --gpu --amp --folds 2 \
    --time-budget "${CV_BUDGET_MIN:-2}" --early_stopping 0 --output "$SCRATCH/budget_cv" > "$OUT/budget_cv.log" 2>&1
  rc=$?; wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  echo "[$(elapsed) s] budget cv exit $rc, the whole command ${wall} s"
  grep -E "recipe auto|precision|ETA: cv|cv ~|folder" "$OUT/budget_cv.log" | head -n 12
  python3 - "$SCRATCH/budget_cv" "$wall" <<'PY' | tee "$OUT/budget_cv.json"
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
summary = next(root.glob("*/cv_summary.json"))
times = json.loads(summary.read_text())["time"]
info = json.loads(next(root.glob("*/fold_0/run_info.json")).read_text())
f, m = times["forecast_min"], times["measured_min"]
print(json.dumps({"time": times, "error": round(abs(f - m) / m, 3), "command_s": float(sys.argv[2]),
                  "precision": info.get("precision"), "hardware": info.get("hardware")}, indent=1))
PY
fi
if [ "${SWEEP:-1}" = 0 ]; then echo "[$(elapsed) s] end"; exit 0; fi
left=$(( BUDGET_S - $(elapsed) - 25 ))
echo "[$(elapsed) s] accuracy sweep, ${left} s left"
# done already (benchmarks/accuracy.md): r18 x 3 seeds (CPU), the MONAI baselines x 3 seeds (H100), r18_mixup (2 folds,
# CPU), mil@0 (CPU), r50 (folds 0-1, CPU), auto64 x 3 and auto64aa x 3 (CPU), r18_64@0 and swin@0 folds (H100,
# 2026-11-26: 16 fold processes under MPS kept the card 100 % busy; a ResNet-18 fold at 64^3 took 220-290 s).
# Next: the 64^3 CNN over seeds (auto64aa here would train at 64^3: the report would pool it with the CPU
# runs of the same name). Each fold is its own process by default
# (FOLD_PARALLEL=1, PARALLEL counts processes); one whole run at a time took the 2026-11-25 sweep past its time.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$OUT/gpu_util.csv" 2>&1 &
SAMPLER=$!
FP=(); [ "${FOLD_PARALLEL:-1}" = 1 ] && FP=(--fold-parallel)  # each fold its own process (PARALLEL counts them)
python3 benchmarks/accuracy.py run --gpu --parallel "${PARALLEL:-16}" --threads 1 --drop-checkpoints "${FP[@]}" \
  --out "$SCRATCH/acc" --hard-minutes "$(python3 -c "print($left / 60)")" --minutes "$(python3 -c "print(max($left - 150, 30) / 60)")" \
  --jobs ${JOBS:-r18_64@1 r18_64@2 r10s1_64@0}
echo "[$(elapsed) s] sweep done"; kill $SAMPLER 2> /dev/null
for f in "$SCRATCH"/acc/logs/*.log; do echo "== $f"; grep -E "epoch +[0-9]+ \||fold [0-9]+ (complete|early)|Error|error" "$f" | tail -n 3; done
tar czf "$OUT/acc.tar.gz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.png' --exclude='events.out*' \
  -C "$SCRATCH/acc" kept timings.json logs runs
[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control
echo "[$(elapsed) s] end"
