#!/usr/bin/env bash
# The GPU checks, run on the lent GPU machine (it has CUDA, PyTorch and transformers, but
# neither Ray nor our audio packages, and reaches no package index). Build the kit here first
# (bash tools/device/build_kit.sh), then call the device tool twice, back to back (the machine
# stays warm ~30 s; each call may run 10 minutes, the whole lease 15):
#
#   run(command="bash tools/device/check.sh imports test", carry=[".device"], timeout_s=560)
#   run(command="bash tools/device/check.sh bench", carry=[".device"], timeout_s=480)
#
# Steps, in the order given (default: imports test):
#   imports  our packages import, and prepare.py featurizes the smoke corpus on Ray (eGeMAPS too)
#   test     pytest tests/test_gpu.py (AMP bf16/fp16 steps; six smoke folds sharing the GPU)
#   bench    jobs/benchmark.py gpu --epochs 1 (base-size wav2vec2, six folds on one GPU, bf16/fp16)
#   kfold    the full demo job with six folds sharing the GPU (--gpus-per-fold 0.16)
# Each step's log and figures land in $OUT (a few small files: what the device tool brings back).
# Checked on this VM with a Python 3.12 venv standing in for the image: `imports` passes; the
# steps that need CUDA have never run.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/device_out}
SITE=${SITE:-/tmp/ser_ray_site}
mkdir -p "$OUT" "$SITE"
[ -f "$SITE/ray/__init__.py" ] || tar -xJf .device/kit.tar.xz -C "$SITE" || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export PYTHONUNBUFFERED=1 SER_RAY_CACHE=${SER_RAY_CACHE:-/tmp/ser_ray_cache}
work=$(mktemp -d)
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
"$PYTHON" - >"$OUT/env.txt" 2>&1 <<'PY'
import platform, ray, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()} torch {torch.__version__} ray {ray.__version__} "
      f"transformers {transformers.__version__} gpu {gpu}")
PY
cat "$OUT/env.txt"
for name in "${@:-imports test}"; do
  for one in $name; do
    case $one in
      imports) step imports 150 "$PYTHON" jobs/prepare.py --smoke-test --runner ray \
                 --out "$work/prepare" ;;
      test) step test 330 "$PYTHON" -m pytest -x -q -p no:cacheprovider tests/test_gpu.py ;;
      bench) step bench 420 "$PYTHON" jobs/benchmark.py gpu --epochs 1 --out "$work/bench"
             cp "$work"/bench/benchmark_gpu.json "$OUT"/ 2>/dev/null ;;
      kfold) step kfold 540 "$PYTHON" jobs/kfold.py --gpus-per-fold 0.16 --out "$work/kfold"
             cp "$work"/kfold/summary.md "$OUT"/kfold_summary.md 2>/dev/null ;;
      *) echo "unknown step $one (choose: imports test bench kfold)"; status=2 ;;
    esac
  done
done
exit $status
