#!/usr/bin/env bash
# The one-command GPU check: GPU tests, kernel benchmarks, the end-to-end training step and the trainer A/B run,
# on one NVIDIA GPU in about 9 minutes, with one summary table at the end.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# OUT_DIR is where the results go: the first argument, else $GPU_CHECK_OUT_DIR, else $OUT, else
# out/gpu-check in the repository. Run it on any machine with an NVIDIA GPU (written for an H100/H200), from a
# checkout where fastroberta's dependencies are installed (torch for your CUDA, then pip install -e
# ".[test,bench]"). It installs nothing from the network: on a machine without network access, put wheels of
# what is missing in .whl/ at the repository root and the setup stage installs them from there. DeepSpeed
# 0.19.8 needs, besides torch and numpy: pydantic>=2 (with pydantic-core), hjson, py-cpuinfo, psutil, msgpack,
# ninja, einops, packaging and tqdm; pydantic-core, psutil, msgpack and ninja are compiled, so their wheels must
# match the machine's Python version and platform (pip download --python-version ... --platform ...).
#
# Stages, in order; each runs under `timeout`, a failing or timed-out stage is recorded and the next one runs:
#   setup    the wheels in .whl/ (if any) into /tmp/site (PYTHONPATH), the repo itself without dependencies, versions
#   tests    pytest on CUDA, in this order: first the tests no GPU has passed yet (GPU_TESTS_FIRST: the fp16
#            cross-entropy gradients, the GELU GEMMs linear_gelu and dgrad_gelu_bias_grad at the FFN's shapes),
#            then the rest of tests/test_gpu_kernels.py (real shapes, fp16 + bf16), the attention tests only a GPU
#            can answer (fp32 exact and TF32, bf16 and head dim 128 at long L, the model), then
#            tests/test_cross_entropy.py and tests/test_layer_norm.py. With FASTROBERTA_AUTOTUNE=0 (each launch
#            compiles its default config and nothing is benchmarked, except in the one test that compares the
#            GELU GEMMs' autotuned configs with their default) and FASTROBERTA_TEST_BUDGET_S a little under the stage's limit: tests not started by then are
#            skipped and counted, and pytest prints its summary.
#   kernels  python -m benchmarks kernels --profile check   (layer_norm, attention, cross_entropy)
#   e2e      python -m benchmarks e2e --profile check       (ZeRO-2, fp16: pretraining step base/seq 512, 4
#            competitors, then fastroberta-triton-compile (the Triton model under torch.compile, as
#            fastroberta-train --compile runs it) when the stage's budget has room for its compile; then the
#            fine-tuning steps, RobertaForSequenceClassification seq 128 batch 32 and RobertaForQuestionAnswering
#            seq 384 batch 32 (start / end positions), padded, fastroberta vs transformers' eager and SDPA)
#   model    python -m benchmarks model --measure           (the base/512 fp16 step under torch.profiler: measured ms
#            per op class next to the cost model's; transformers eager and SDPA, fastroberta)
#   train    python -m benchmarks train                     (base, seq 512, fp16, ZeRO-2, Triton vs torch; the
#            data is prepared once before the two timed runs, which then find it in the trainer's cache)
#   hf       python -m benchmarks hf --profile check        (transformers' RoBERTa-base fine-tuning and MLM steps,
#            fastroberta.apply_kernels vs eager and SDPA, fp16 + bf16; its table is printed into gpu_check.log)
#   report   python -m benchmarks report --print            (the issues' targets against what was measured)
# Each stage may use what earlier ones left of the schedule below; the benchmarks get a --time-budget a little
# under their limit so that they stop between cases and still write their results. The benchmarks autotune
# (outside their timed windows); the Triton cache they share is empty on a fresh machine.
#
# Cold-cache budget (a fresh machine: every kernel compiled for the first time). Compile times measured with
# Triton 3.6: ~1.1 s per attention kernel variant, ~0.5 s per LayerNorm / cross-entropy variant, ~18 s per new
# fp16/bf16 attention autotune key (6 + 5 + 5 configs compiled and timed); Inductor ~25 s per new shape.
#   stage    planned s  cold-cache estimate
#   setup        40     10-30   pip of the .whl/ wheels (no compiling), imports
#   tests        90     ~110    ~10 startup + test_gpu_kernels ~70 (~30 attention variants, ~15 LN/CE, ~8 GELU
#                               GEMM variants: 2 kernels x 2 dtypes x aligned / odd rows, + 8 autotuned configs;
#                               the GELU GEMMs' compile times not yet measured) +
#                               attention GPU tests ~30 (~25 variants); the CE and LN files run on what is
#                               left and the budget skips the rest (they also run under the CPU interpreter)
#   kernels     110     ~130    attention ~5 autotune keys x ~18 s, LN ~25 (Inductor, first case) + ~5, CE ~10;
#                               its --time-budget cuts the cases that do not fit and says so
#   e2e         180     ~210    10 workers x ~10 s DeepSpeed start + autotune of the training keys (compiles
#                               cached by kernels) + steps; the QA step's 3 workers (the last added, not yet run on
#                               a GPU) run when the budget has room; the compiled competitor only if 90 s are left
#   model        45     ~40     3 profiled + 3 warm-up steps x 3 competitors, base/512 fp16 (no autotune: kernels' keys
#                               are warm from e2e)
#   train        90     ~80     the base preset's tokenizer and shards prepared once before the runs (~5 s on 2
#                               CPU cores), then 2 trainer runs x (~20 s start + 200 steps of ~0.1 s + autotune)
#   hf          120     rest    transformers' steps; runs on what the stages before it left of the total
#   report       20     <5
# Measured on the first run (NVIDIA H200, cold caches, GPU_CHECK_BUDGET_S=565; benchmarks/results/nvidia-h200/):
# setup 22 s, tests 102 (51 tests not reached), kernels 93 (4 attention cases cut), e2e 177 (the fine-tuning
# competitors and the compiled one cut), model 26, train 114 (both runs needed more than their 52 s: the base
# preset's first data preparation), hf skipped (no time left). A run that must cover every stage needs about
# 800 s on a cold machine, or a second call with GPU_CHECK_STAGES="train hf".
#
# Knobs (environment): GPU_CHECK_BUDGET_S (total, default 530), T_SETUP T_TESTS T_KERNELS T_E2E T_TRAIN T_HF
# (planned seconds per stage; T_MODEL too), GPU_CHECK_STAGES (default "tests kernels e2e model train hf"; hf comes last and runs on
# what the earlier stages leave of the total: GPU_CHECK_STAGES=hf runs it alone for T_HF seconds), GPU_TESTS
# (pytest paths), GPU_TESTS_FIRST (node ids without parameters that run before the rest; empty: pytest's order), TRAIN_STEPS (200), TRAIN_MICRO_BATCH (16), TRAIN_OPTIMIZER (torch_adamw: DeepSpeed's fused Adam
# would first JIT-build a CUDA extension with nvcc; set it empty for the trainer's default), TRAIN_EXTRA_ARGS,
# E2E_ARGS, KERNEL_ARGS and HF_ARGS (extra flags for those commands), FASTROBERTA_GIT_COMMIT (the commit to
# stamp: the GPU machine's copy of the tree has no .git), PYTHON (default python3), GPU_CHECK_SKIP_INSTALL=1 (use
# the fastroberta already installed), GPU_CHECK_SMOKE=1 (a dry run of the plumbing on a machine without a GPU:
# every stage in its smoke mode, tiny and fast, on CPU; its figures are no performance result, and the summary
# says so).
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
T_MODEL=${T_MODEL:-45}
PLANNED=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRAIN_STEPS=${TRAIN_STEPS:-200} TRAIN_MICRO_BATCH=${TRAIN_MICRO_BATCH:-16}
export TRAIN_OPTIMIZER=${TRAIN_OPTIMIZER-torch_adamw}
PY=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then  # the dry run: every stage's smoke mode, tiny and on CPU
  PROFILE="--smoke"
  SMOKE_KERNELS="--only layer_norm"
  SMOKE_E2E="--tasks mlm,qa --competitors fastroberta-torch"
  SMOKE_HF="--workloads finetune --competitors hf-sdpa,hf+fastroberta"
  SMOKE_TRAIN="--smoke"
  MODEL_ARGS="--cases tiny --competitors hf-sdpa,fastroberta --gpus H200"
  export FASTROBERTA_BENCH_PROFILE=smoke
else
  PROFILE="--profile check"
  SMOKE_KERNELS="" SMOKE_E2E="" SMOKE_HF=""
  # the whole-step cost model's base/512 case, measured per op class next to its modelled figures
  MODEL_ARGS="--measure --cases pretrain-base-512 --competitors hf-eager,hf-sdpa,fastroberta --gpus H200,'H100 SXM'"
fi

elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME PLANNED_SECONDS 'command' [SIGNAL]   ('@BUDGET@' in the command becomes the stage's time budget;
# SIGNAL is what `timeout` sends first, TERM unless given: pytest prints its summary on INT)
stage() {
  local name=$1 planned=$2 cmd=$3 signal=${4:-TERM}
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
  timeout -s "$signal" -k 15 "$limit" bash -c "$cmd" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT (${limit}s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local note
  if [ "$name" = tests ]; then  # pytest's closing line, e.g. "3 failed, 40 passed in 61.2s", and what the budget cut
    note=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$WORK/logs/$name.log" | tail -n 1 | tr -d '=')
    note="$note$(grep -E '^time budget: ' "$WORK/logs/$name.log" | sed 's/^time budget: /; budget: /; s/ (FASTROBERTA.*//')"
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
# Most telling first: what is not reached in the budget is skipped and counted (tests/time_budget.py). The tests
# no GPU has passed yet run before all else, wherever their files come in GPU_TESTS (FASTROBERTA_TESTS_FIRST).
if [ -z "${GPU_TESTS_FIRST+set}" ]; then
  if [ "$SMOKE" = 1 ]; then
    GPU_TESTS_FIRST="tests/test_gpu_kernels.py::test_mlm_cross_entropy_real_shapes"
  else
    GPU_TESTS_FIRST=""
    for t in test_mlm_cross_entropy_fp16_gradients_at_every_loss_scale test_mlm_cross_entropy_keeps_the_fp16_loss_scale \
             test_mlm_cross_entropy_real_shapes test_linear_gelu_real_shapes test_dgrad_gelu_bias_grad_real_shapes \
             test_layer_norm_with_input_bias_real_shapes test_layer_norm_weight_grads_are_deterministic; do
      GPU_TESTS_FIRST="$GPU_TESTS_FIRST tests/test_gpu_kernels.py::$t"
    done
  fi
fi
if [ -z "${GPU_TESTS:-}" ]; then
  if [ "$SMOKE" = 1 ]; then
    GPU_TESTS="tests/test_gpu_kernels.py::test_layer_norm_real_shapes tests/test_gpu_kernels.py::test_mlm_cross_entropy_real_shapes"
  else
    GPU_TESTS="tests/test_gpu_kernels.py"
    for t in test_custom_scale_int_mask_and_large_scores test_tf32_attention_meets_its_tolerance \
             test_matches_reference_long test_model_triton_matches_torch; do
      GPU_TESTS="$GPU_TESTS tests/test_attention.py::$t"
    done
    GPU_TESTS="$GPU_TESTS tests/test_cross_entropy.py tests/test_layer_norm.py"
  fi
fi
for s in ${GPU_CHECK_STAGES:-tests kernels e2e model train hf}; do
  case $s in
    tests)   if [ -n "${GPU_TESTS// /}" ]; then
               stage tests "$T_TESTS" "FASTROBERTA_AUTOTUNE=0 FASTROBERTA_TEST_BUDGET_S=@BUDGET@ \
                 FASTROBERTA_TESTS_FIRST='${GPU_TESTS_FIRST:-}' \
                 $PY -m pytest -q -rfE -p no:cacheprovider $GPU_TESTS" INT
             else
               printf 'tests\tskipped (no test files)\t0\t\n' >> "$STAGES"
             fi ;;
    kernels) stage kernels "$T_KERNELS" \
               "$PY -m benchmarks kernels $PROFILE $SMOKE_KERNELS --out $RESULTS --time-budget @BUDGET@ ${KERNEL_ARGS:-}" ;;
    e2e)     stage e2e "$T_E2E" \
               "$PY -m benchmarks e2e $PROFILE $SMOKE_E2E --out $RESULTS --time-budget @BUDGET@ ${E2E_ARGS:-}" ;;
    model)   stage model "$T_MODEL" "$PY -m benchmarks model $MODEL_ARGS --out $RESULTS/model" ;;
    train)   stage train "$T_TRAIN" \
               "$PY -m benchmarks train ${SMOKE_TRAIN:-} --out $RESULTS --work-dir $WORK/train --time-budget @BUDGET@" ;;
    hf)      stage hf "$T_HF" \
               "$PY -m benchmarks hf $PROFILE $SMOKE_HF --out $RESULTS --time-budget @BUDGET@ ${HF_ARGS:-}" ;;
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
  [ "$SMOKE" = 1 ] && echo "**SMOKE DRY RUN (GPU_CHECK_SMOKE=1): the plumbing on CPU, tiny shapes; no figure here is a performance result.**" && echo
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
  [ "$SMOKE" = 1 ] && echo "SMOKE DRY RUN (GPU_CHECK_SMOKE=1): plumbing only, no performance result"
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
