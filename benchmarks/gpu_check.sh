#!/usr/bin/env bash
# One GPU check, offline, in at most ~8 minutes: install the wheels that travel with the tree,
# build a ~1B-parameter Llama (TinyLlama-1.1B's shape, random weights, the embedded tokenizer),
# then
#   1. gpu_strategies.py: every strategy (DDP, FSDP2 plain / shard_base / cpu_offload, ZeRO-2/3)
#      in bf16: tokens/s, MFU, the dtype the adapters computed in (must be bf16), allocated and
#      reserved peaks against the plan; then merge the DDP run and generate from the merge;
#   2. baseline.py: plain HF Trainer + PEFT + bitsandbytes against `orchestrate train`;
#   3. saved_activations.py: the planner's activation model against what autograd saves on CUDA;
# write a results table to $OUT/gpu_results.md (and print it), and exit non-zero if any failed.
# One GPU means one rank: what only several ranks show (NCCL groups, sharding across ranks)
# stays with the CPU tests' two gloo ranks.
#
#   bash benchmarks/gpu_wheels.sh                 # once, on a machine with the package registry
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (carry [".whl"])
#
# Environment: OUT (results folder, default benchmarks/gpu_out), STEPS (default 20),
# PY (python, default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONPATH="$PWD"
PY=${PY:-python3}
OUT=${OUT:-benchmarks/gpu_out}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/gpu_results.md"
: >"$LOG"
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import torch, transformers, peft, sys
print(f"python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
      f"transformers {transformers.__version__} peft {peft.__version__} gpu {torch.cuda.get_device_name(0)}")
PY

# Packages the machine lacks, from .whl/ only (no network there).
missing=()
for mod_pkg in bitsandbytes:bitsandbytes hydra:hydra-core omegaconf:omegaconf deepspeed:deepspeed; do
    "$PY" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing from .whl/: ${missing[*]}"
    "$PY" -m pip install -q --no-index --find-links .whl "${missing[@]}" >>"$LOG" 2>&1 \
        || say "pip install failed (see $LOG); continuing with what is importable"
fi
has_ds=1; "$PY" -c "import deepspeed" >/dev/null 2>&1 || has_ds=0
"$PY" -c "import bitsandbytes, hydra, omegaconf" >>"$LOG" 2>&1 || { say "bitsandbytes/hydra missing: cannot run"; exit 1; }

CACHE=$(mktemp -d)
MODEL=$CACHE/1b
say "building the ~1B model at $MODEL"
timeout 150 "$PY" benchmarks/synthetic.py 1b "$MODEL" >>"$LOG" 2>&1 || { say "model build failed"; exit 1; }

{
    echo "# GPU check"
    echo
    echo "Machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1), $(date -u +%Y-%m-%d)."
    echo "Model: random Llama, TinyLlama-1.1B shape (hidden 2048, 22 layers, GQA 32/4), vocabulary 128;"
    echo "tiny_instruct data, micro-batch 4, global batch 16, max_seq_len 128, $STEPS steps, one GPU, bf16."
    echo
    echo "## Every strategy: speed, the dtype the adapters computed in, planned against measured memory"
    echo
} >"$RESULTS"
failed=0
say "strategies (gpu_strategies.py), then merge and generate"
timeout 330 "$PY" benchmarks/gpu_strategies.py --model "$MODEL" --steps "$STEPS" --out "$CACHE/runs" \
    2>>"$LOG" | tee -a "$RESULTS"
[ "${PIPESTATUS[0]}" = 0 ] || { failed=1; echo "strategy check FAILED (see gpu_check.log)" | tee -a "$RESULTS"; }
[ "$has_ds" = 1 ] || echo "(DeepSpeed not importable: zero2/zero3 failed above)" >>"$RESULTS"

{ echo; echo "## Baseline (HF Trainer + PEFT + bitsandbytes) against orchestrate train"; echo; } >>"$RESULTS"
say "baseline comparison"
timeout 120 "$PY" benchmarks/baseline.py --model "$MODEL" --steps "$STEPS" 2>>"$LOG" | tee -a "$RESULTS"
[ "${PIPESTATUS[0]}" = 0 ] || { failed=1; echo "baseline comparison failed or timed out (see gpu_check.log)" | tee -a "$RESULTS"; }

{ echo; echo "## Activation model on CUDA: bytes autograd saves in one forward against the plan"; echo; } >>"$RESULTS"
say "saved activations"
timeout 60 "$PY" -m torch.distributed.run --nproc_per_node 1 benchmarks/saved_activations.py --model "$MODEL" \
    data.max_seq_len=128 trainer.micro_batch_size=4 strategy=ddp 2>>"$LOG" | tee -a "$RESULTS"
[ "${PIPESTATUS[0]}" = 0 ] || { failed=1; echo "saved-activation probe failed or timed out (see gpu_check.log)" | tee -a "$RESULTS"; }
say "done in $(( $(date +%s) - start )) s; results in $RESULTS"
cat "$RESULTS"
exit $failed
