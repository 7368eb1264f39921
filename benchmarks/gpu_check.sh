#!/usr/bin/env bash
# The one-command GPU check: GPU tests, kernel benchmarks, the end-to-end training step and the trainer A/B run,
# on one GPU in about 9 minutes, with one summary table at the end.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# OUT_DIR is where the results go: the first argument, else $GPU_CHECK_OUT_DIR, else $OUT, else
# out/gpu-check in the repository. Run it on a machine with one NVIDIA GPU, from a checkout where fastroberta's
# dependencies are installed (torch for your CUDA, then pip install -e ".[test,bench]"). It installs nothing
# from the network: on a machine without network access, put wheels of what is missing (DeepSpeed and its
# pure-Python dependencies) in .whl/ at the repository root and the setup stage installs them from there.
#
# Stages, in order; each runs under `timeout`, a failing or timed-out stage is recorded and the next one runs:
#   setup    the wheels in .whl/ (if any) into /tmp/site (PYTHONPATH), the repo itself without dependencies, versions
#   tests    pytest on CUDA: tests/test_gpu_kernels.py (real shapes, fp16 + bf16) and the kernel test files
#   kernels  python -m benchmarks kernels --profile check   (layer_norm, attention, cross_entropy)
#   e2e      python -m benchmarks e2e --profile check       (ZeRO-2, fp16: pretraining step base/seq 512, 4
#            competitors, then fastroberta-triton-compile (the Triton model under torch.compile, as
#            fastroberta-train --compile runs it) when the stage's budget has room for its compile; then the
#            fine-tuning step, RobertaForSequenceClassification seq 128 batch 32, padded, fastroberta vs
#            transformers' eager and SDPA)
#   train    python -m benchmarks train                     (base, seq 512, fp16, ZeRO-2, Triton vs torch)
#   hf       python -m benchmarks hf --profile check        (transformers' RoBERTa-base fine-tuning and MLM steps,
#            fastroberta.apply_kernels vs eager and SDPA, fp16 + bf16; its table is printed into gpu_check.log)
#   report   python -m benchmarks report --print            (the issues' targets against what was measured)
# Each stage may use what earlier ones left of the schedule below; the benchmarks get a --time-budget a little
# under their limit so that they stop between cases and still write their results.
#
# Knobs (environment): GPU_CHECK_BUDGET_S (total, default 530), T_SETUP T_TESTS T_KERNELS T_E2E T_TRAIN T_HF
# (planned seconds per stage), GPU_CHECK_STAGES (default "tests kernels e2e train hf"; hf comes last and runs on
# what the earlier stages leave of the total: GPU_CHECK_STAGES=hf runs it alone for T_HF seconds), GPU_TESTS
# (pytest paths), TRAIN_STEPS (200), TRAIN_MICRO_BATCH (16), TRAIN_OPTIMIZER (torch_adamw: DeepSpeed's fused Adam
# would first JIT-build a CUDA extension; set it empty for the trainer's default), TRAIN_EXTRA_ARGS, E2E_ARGS,
# KERNEL_ARGS and HF_ARGS (extra flags for those commands), FASTROBERTA_GIT_COMMIT (the commit to stamp: the GPU
# machine's copy of the tree has no .git), PYTHON (default python3), GPU_CHECK_SKIP_INSTALL=1 (use the fastroberta
# already installed: for a dry run of the plumbing on a development machine).
#
# Output under OUT_DIR, a flat folder of 8 files that is easy to copy off the GPU machine:
#   summary.md          stage table + targets table (also printed last)
#   gpu_check.log       every stage's output, then the summary
#   results.tar.gz      benchmarks/results/<device>/... (extract at the repo root to commit) and logs/
#   layer_norm.md attention.md cross_entropy.md e2e.md train.md   the per-benchmark tables
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT_DIR=${1:-${GPU_CHECK_OUT_DIR:-${OUT:-$REPO/out/gpu-check}}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
RESULTS=$WORK/benchmarks/results
mkdir -p "$RESULTS" "$WORK/logs"
STAGES=$WORK/stages.tsv
: > "$STAGES"

T0=$(date +%s)
TOTAL=${GPU_CHECK_BUDGET_S:-530}
RESERVE=20  # report + packing
T_SETUP=${T_SETUP:-40}
T_TESTS=${T_TESTS:-90}
T_KERNELS=${T_KERNELS:-110}
T_E2E=${T_E2E:-180}
T_TRAIN=${T_TRAIN:-90}
T_HF=${T_HF:-120}
PLANNED=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRAIN_STEPS=${TRAIN_STEPS:-200} TRAIN_MICRO_BATCH=${TRAIN_MICRO_BATCH:-16}
export TRAIN_OPTIMIZER=${TRAIN_OPTIMIZER-torch_adamw}
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME PLANNED_SECONDS 'command'   ('@BUDGET@' in the command becomes the stage's time budget)
stage() {
  local name=$1 planned=$2 cmd=$3
  PLANNED=$(( PLANNED + planned ))
  local now limit left
  now=$(date +%s)
  limit=$(( T0 + PLANNED - now ))              # what the schedule allows, earlier savings included
  left=$(( T0 + TOTAL - RESERVE - now ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    printf '%s\tskipped (no time left)\t0\t\n' "$name" >> "$STAGES"
    echo "=== [$name] skipped: ${limit}s left"
    return
  fi
  cmd=${cmd//@BUDGET@/$(( limit - 20 > 10 ? limit - 20 : 10 ))}
  echo "=== [$name] limit ${limit}s at +$(elapsed)s: $cmd"
  local start rc status
  start=$(date +%s)
  timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT (${limit}s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local note
  if [ "$name" = tests ]; then  # pytest's closing line, e.g. "3 failed, 40 passed in 61.2s"
    note=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$WORK/logs/$name.log" | tail -n 1 | tr -d '=')
  else
    note=$(grep -v '^[[:space:]]*$' "$WORK/logs/$name.log" | tail -n 1)
  fi
  note=$(echo "$note" | tr '\t|' '  ' | cut -c1-140)
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$note" >> "$STAGES"
  echo "=== [$name] $status after $(( $(date +%s) - start ))s"
}

# ------------------------------------------------------------------------------------------------- setup
setup() {
  echo "=== [setup] at +$(elapsed)s"
  nvidia-smi -L || true
  if compgen -G ".whl/*.whl" > /dev/null; then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ wheelhouse: DeepSpeed must already be installed"
  fi
  # The repo without dependencies; where pip cannot install it here, the repository root on PYTHONPATH
  # (below) makes fastroberta importable all the same.
  if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    echo "GPU_CHECK_SKIP_INSTALL=1: using the installed fastroberta"
  elif ! timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    echo "editable install failed: importing fastroberta from the repository root"
  fi
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  "$PY" - <<'EOF'
import importlib.metadata as md, torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
for dist in ("torch", "triton", "deepspeed", "transformers", "pytest-benchmark", "matplotlib"):
    try:
        print(f"{dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
import fastroberta.kernels, deepspeed  # noqa: F401  (fail the stage here rather than in every later one)
EOF
}
start=$(date +%s)
setup > "$WORK/logs/setup.log" 2>&1   # not through a pipe: its exports must reach this shell
rc=$?
cat "$WORK/logs/setup.log"
status=ok
[ $rc = 0 ] || status="FAILED (exit $rc)"
printf 'setup\t%s\t%s\t\n' "$status" "$(( $(date +%s) - start ))" >> "$STAGES"
PLANNED=$T_SETUP
export PYTHONPATH

# ------------------------------------------------------------------------------------------------ stages
if [ -z "${GPU_TESTS:-}" ]; then
  GPU_TESTS=""
  for f in tests/test_gpu_kernels.py tests/test_layer_norm.py tests/test_attention.py \
           tests/test_cross_entropy.py; do
    [ -f "$f" ] && GPU_TESTS="$GPU_TESTS $f"
  done
fi
for s in ${GPU_CHECK_STAGES:-tests kernels e2e train hf}; do
  case $s in
    tests)   if [ -n "${GPU_TESTS// /}" ]; then
               stage tests "$T_TESTS" "$PY -m pytest -q -rfE -p no:cacheprovider $GPU_TESTS"
             else
               printf 'tests\tskipped (no test files)\t0\t\n' >> "$STAGES"
             fi ;;
    kernels) stage kernels "$T_KERNELS" \
               "$PY -m benchmarks kernels --profile check --out $RESULTS --time-budget @BUDGET@ ${KERNEL_ARGS:-}" ;;
    e2e)     stage e2e "$T_E2E" \
               "$PY -m benchmarks e2e --profile check --out $RESULTS --time-budget @BUDGET@ ${E2E_ARGS:-}" ;;
    train)   stage train "$T_TRAIN" \
               "$PY -m benchmarks train --out $RESULTS --work-dir $WORK/train --time-budget @BUDGET@" ;;
    hf)      stage hf "$T_HF" \
               "$PY -m benchmarks hf --profile check --out $RESULTS --time-budget @BUDGET@ ${HF_ARGS:-}" ;;
    *)       echo "unknown stage $s (GPU_CHECK_STAGES)" ;;
  esac
done

# ------------------------------------------------------------------------------------------------ report
timeout 30 "$PY" -m benchmarks report --results "$RESULTS" --summary "$WORK/SUMMARY.md" --print \
  > "$WORK/logs/report.log" 2>&1
rc=$?
{
  echo "# GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s in all, commit ${FASTROBERTA_GIT_COMMIT:-unknown}"
  echo
  echo "| stage | status | seconds | note |"
  echo "|---|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$STAGES"
  echo
  [ -f "$WORK/SUMMARY.md" ] && sed '1,/^$/d' "$WORK/SUMMARY.md"
} > "$OUT_DIR/summary.md"

for name in layer_norm attention cross_entropy e2e train; do  # by name: at most 8 files come back
  for f in "$RESULTS"/*/"$name.md"; do
    [ -f "$f" ] && cp "$f" "$OUT_DIR/$name.md"
  done
done

summary() {
  echo
  echo "================================ GPU check summary ($(elapsed) s) ================================"
  printf '%-8s  %-22s  %7s  %s\n' stage status seconds note
  awk -F'\t' '{printf "%-8s  %-22s  %7s  %s\n", $1, $2, $3, $4}' "$STAGES"
  [ $rc = 0 ] || echo "report: FAILED (exit $rc), see logs/report.log"
  sed -n '/^$/,$p' "$WORK/logs/report.log"
  echo
  echo "to commit: tar xzf results.tar.gz benchmarks/results && python -m benchmarks report --readme README.md"
}
summary > "$WORK/logs/summary.log"
cat "$WORK/logs/"{setup,tests,kernels,e2e,train,hf,report,summary}.log > "$OUT_DIR/gpu_check.log" 2>/dev/null
(cd "$WORK" && tar czf "$OUT_DIR/results.tar.gz" benchmarks/results logs stages.tsv)
cat "$WORK/logs/summary.log"
echo "files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
