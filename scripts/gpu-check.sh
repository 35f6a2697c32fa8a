#!/usr/bin/env bash
# Does cruijff really fine-tune and evaluate on the GPU? On a machine with CUDA: build and run
# one small experiment with cruijff's CLI (local executor, offline) on the family-shaped tiny
# models cruijff/tiny-llama3 and cruijff/tiny-qwen2.5 and on the quickstart's model
# cruijff/tiny-llama (the examples/capitalization task), every stage on cuda in bf16; then
# check that each stage ran on the GPU and print, per stage, its wall time, peak GPU memory
# and tokens/s (scripts/gpu_check.py). Exit code 1 when a stage did not run on the GPU.
# Without CUDA it prints one line and exits 0. Meant to take under 5 minutes on a GPU machine
# (models made included); not yet measured on one.
#
#   bash scripts/gpu-check.sh            # on a GPU machine
#   bash scripts/gpu-check.sh --cpu      # the same checks with device cpu (works anywhere)
#   bash scripts/gpu-check.sh --keep DIR # work in DIR and keep it (default: a temp folder)
#   bash scripts/gpu-check.sh --model M  # check model M (repeatable) instead of the three
#
# Uses the venv in $CRUIJFF_VENV or .venv if there is one (installs nothing), and downloads
# nothing: the tiny models are made locally.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CRUIJFF_VENV:-$repo/.venv}"
if [[ -x "$venv/bin/python" ]]; then export PATH="$venv/bin:$PATH"; fi

device=cuda finetune_dtype=bf16 eval_dtype=bfloat16 work="" models=()
while (( $# )); do
  case "$1" in
    --cpu) device=cpu finetune_dtype=fp32 eval_dtype=float32 ;;
    --keep) work="${2:?--keep needs a folder}"; shift ;;
    --model) models+=("${2:?--model needs a model id}"); shift ;;
    *) echo "usage: bash scripts/gpu-check.sh [--cpu] [--keep DIR] [--model ID ...]" >&2; exit 2 ;;
  esac
  shift
done

# "True torch 2.x, CUDA 12.x, <GPU name>" or "False torch 2.x+cpu, CUDA None"
torch_info=$(python -c 'import torch; cuda = torch.cuda.is_available(); print(cuda,
  f"torch {torch.__version__}, CUDA {torch.version.cuda}" + (f", {torch.cuda.get_device_name()}" if cuda else ""))')
if [[ $device == cuda && $torch_info != True* ]]; then
  echo "gpu-check: no CUDA here (${torch_info#* }: torch.cuda.is_available() is False): nothing checked"
  exit 0
fi

started=$SECONDS
if [[ -z $work ]]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/cruijff-gpu-check.XXXXXX")"
  keep=0
else
  mkdir -p "$work"; work="$(cd "$work" && pwd)"
  keep=1
fi
experiment="$work/gpu-check"
# Offline; a private cruijff home (its own Prefect server, stopped at the end); every Python
# process that uses torch records its peak CUDA memory in $work/peaks (gpu_check.py says why).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 CRUIJFF_OFFLINE=1 CRUIJFF_HOME="$work/home"
unset PREFECT_API_URL  # not a server someone else runs: the private home's own
export CRUIJFF_GPU_CHECK_PEAKS="$work/peaks"
export PYTHONPATH="$repo/scripts/lib/cuda_peak${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$experiment" "$CRUIJFF_GPU_CHECK_PEAKS"  # a kept folder's earlier check (not its models)
mkdir -p "$CRUIJFF_GPU_CHECK_PEAKS"
finish() {
  code=$?
  cruijff server stop >/dev/null 2>&1 || true
  if (( code == 0 && ! keep )); then rm -rf "$work"; else echo "gpu-check: files kept in $work"; fi
}
trap finish EXIT

cat > "$work/config.yaml" <<EOF
model_dir: models
data_dir: data
tasks_dir: $repo/examples/capitalization/tasks
use_fine_tune: true
use_prompt_opt: false
run_control_trials: true
orchestration:
  executor: local
EOF

echo "gpu-check: stages on $device ($finetune_dtype); ${torch_info#* }; working in $work"

if (( ${#models[@]} == 0 )); then models=(cruijff/tiny-llama cruijff/tiny-llama3 cruijff/tiny-qwen2.5); fi
for model in "${models[@]}"; do
  begin=$SECONDS
  cruijff model get "$model" --model-dir "$work/models" >/dev/null
  echo "gpu-check: $model made locally in $((SECONDS - begin))s"
done

# One trial per model, one stage at a time (--workers 1), so that each stage's wall time and
# tokens/s are its own. Few steps and samples: this checks where stages run, not results.
begin=$SECONDS
run_args=(
  --config-path "$work/config.yaml" --root "$work" --name gpu-check --workers 1 --quiet
  --task capitalization --dataset words_5L_80_1000.json
  --control "finetune.device=$device" --control "finetune.dtype=$finetune_dtype"
  --control "eval.model_args.device=$device" --control "eval.model_args.dtype=$eval_dtype"
  --control finetune.epochs=1 --control finetune.max_steps_per_epoch=10
  --control finetune.log_peak_memory_stats=true --control eval.limit=20
)
for model in "${models[@]}"; do run_args+=(--model "$model"); done
if ! cruijff run "${run_args[@]}" > "$work/run.log" 2>&1; then
  echo "gpu-check: cruijff run failed; the end of its output ($work/run.log):"
  tail -n 20 "$work/run.log"
fi
echo "gpu-check: cruijff run took $((SECONDS - begin))s"

python "$repo/scripts/gpu_check.py" "$experiment" --device "$device" \
  --peaks "$CRUIJFF_GPU_CHECK_PEAKS" || status=$?
echo "gpu-check: $((SECONDS - started))s in all, the models' making included"
exit "${status:-0}"
