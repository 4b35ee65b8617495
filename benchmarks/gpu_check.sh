#!/usr/bin/env bash
# One prepared run of every CUDA check (issue 21): gpu-marked tests, the kernel micro-benchmark,
# the engine benchmark in bf16 (llama-1b and small presets, r16, 16 adapters, batch 64, against
# transformers + PEFT on the same GPU) and a torch.profiler table of a decode step.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repo root
#   DEV=cpu BIG=tiny SMALL=tiny N=8 TOK=4 OUT=/tmp/out bash benchmarks/gpu_check.sh   # CPU dry run
#
# SKIP_TESTS=1, SKIP_KERNELS=1, SKIP_PROFILE=1 leave a step out; GPU_TESTS names the test paths.
# Every step has its own timeout and the script goes on past failures; each step's exit status
# is logged as "== step: rc=N (Ts)". Results land in $OUT (at most 8 files): gpu_check.log,
# prebuild.log, kernels.json, bench_big.json, bench_small.json, profile.txt, profile.json.
set -u
OUT=${OUT:?set OUT to the results folder}
DEV=${DEV:-cuda}
BIG=${BIG:-llama-1b}
SMALL=${SMALL:-small}
N=${N:-64}
TOK=${TOK:-32}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COLUMNS=200 TERM=dumb
export MLORA_BENCH_CACHE=${MLORA_BENCH_CACHE:-/tmp/mlora-bench-cache}
LOG=$OUT/gpu_check.log
MLORA=(python3 -c 'import sys; from mlora_cli.main import main; sys.argv[0] = "mlora"; main()')  # `timeout` needs a program

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name: start (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc ($((SECONDS - t0))s)" | tee -a "$LOG"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  python3 -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee -a "$LOG"

# Build the preset models and their adapters on the CPU cores: the small one now, the big one
# in the background while the GPU runs the tests and the kernel bench (~60 s for llama-1b on 16
# cores). The engine benches wait for it: they are host-bound, and a build beside them slowed the
# small preset's homogeneous decode from 32 to 48 ms per step on the H200.
prebuild() {
  python3 - "$1" <<'EOF'
import sys, time
from engine.bench.presets import build_adapters, build_preset_model, quiet_transformers
quiet_transformers()
t = time.monotonic()
d = build_preset_model(sys.argv[1])
build_adapters(d, rank=16, count=16)
print(f"{sys.argv[1]}: built in {time.monotonic() - t:.1f}s at {d}", flush=True)
EOF
}
prebuild "$SMALL" >>"$OUT/prebuild.log" 2>&1
prebuild "$BIG" >>"$OUT/prebuild.log" 2>&1 &
PREBUILD=$!

if [ "$DEV" = cuda ] && [ -z "${SKIP_TESTS:-}" ]; then
  step "gpu tests" 150 python3 -m pytest -m "gpu and not slow" -q --timeout 120 --maxfail 15 -p no:cacheprovider \
    ${GPU_TESTS:-tests/kernels tests/lora/test_slots.py tests/engine/test_cuda.py}
fi
if [ -n "${SKIP_KERNELS:-}" ]; then
  :
elif [ "$DEV" = cuda ]; then
  step "kernel bench" 120 "${MLORA[@]}" bench --kernels --device cuda --json "$OUT/kernels.json"
else
  step "kernel bench" 300 "${MLORA[@]}" bench --kernels --device cpu --quick --json "$OUT/kernels.json"
fi

t0=$SECONDS; wait $PREBUILD; echo "== prebuild: rc=$? (waited $((SECONDS - t0))s)" | tee -a "$LOG"
cat "$OUT/prebuild.log" >>"$LOG"

common=(--device "$DEV" --dtype bfloat16 --rank 16 --max-loras 16 -n "$N" --max-tokens "$TOK" --no-separate --no-churn)
step "engine bench $SMALL" 75 "${MLORA[@]}" bench --preset "$SMALL" "${common[@]}" --json "$OUT/bench_small.json"

step "engine bench $BIG" 150 "${MLORA[@]}" bench --preset "$BIG" "${common[@]}" --json "$OUT/bench_big.json"
[ -n "${SKIP_PROFILE:-}" ] || step "profile $BIG" 75 python3 -m benchmarks.profile_decode --preset "$BIG" --device "$DEV" --dtype bfloat16 \
  --batch "$N" --adapters 16 --steps 8 --out "$OUT/profile.txt" --json "$OUT/profile.json"
echo "== done in ${SECONDS}s" | tee -a "$LOG"
