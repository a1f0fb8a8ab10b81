#!/usr/bin/env bash
# LoRA on SmolLM2-135M-Instruct with guided LoRA dropout against uniform LoRA dropout and its two
# controls (issue 22), on the embedded sentiment task; resumable: rerun this script to continue.
#   bash benchmarks/real_lora_sweep.sh [OUT]      (default OUT: out/real/lora)
# Two single-thread halves run at once (restart seeds 0-2 and 3-5, each over both fractions), each
# with its own journal; once both are complete their rows are merged into one journal and the full
# 6-restart command runs over it: it finds every run done and writes the summary CSV and the plot.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/out/real/lora}
mkdir -p "$OUT" && cd "$OUT"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=${LANDSCAPE_CODE:-$ROOT}
CK=~/.cache/landscape/checkpoints/smollm2-135m-instruct
COMMON=(--model $CK --lora r=8,alpha=16,targets=q_proj,v_proj,layers=22-29 --fisher smollm2_fisher.safetensors
        --regularizer dropout,guided,dropout-matched,guided-shuffled --fractions 1,0.25
        --max-train 192 --max-test 120 --lr 3e-3 --batch-size 16 --seq-len 48 --epochs 2 --threads 1)
[ -f smollm2_fisher.safetensors ] || python3 -m landscape.cli fisher --model $CK --max-samples 32 --seq-len 128 \
    --batch-size 8 --quiet --out smollm2_fisher.safetensors > fisher.log 2>&1
python3 -m landscape.cli finetune "${COMMON[@]}" --seed 0 --restarts 3 --out half_a.csv > half_a.log 2>&1 &
python3 -m landscape.cli finetune "${COMMON[@]}" --seed 3 --restarts 3 --out half_b.csv > half_b.log 2>&1 &
wait
rows() { tail -n +2 "$1" 2>/dev/null | grep -c . ; }
if [ "$(rows half_a_runs.csv)" -ge 24 ] && [ "$(rows half_b_runs.csv)" -ge 24 ]; then
    { cat half_a_runs.csv; tail -n +2 half_b_runs.csv; } > smollm2_lora_paucity_runs.csv
    cp half_a_runs.csv.settings.json smollm2_lora_paucity_runs.csv.settings.json
    python3 -m landscape.cli finetune "${COMMON[@]}" --seed 0 --restarts 6 --out smollm2_lora_paucity.csv \
        > summary.log 2>&1
    echo "done: $OUT/summary.log"
else
    echo "halves incomplete: rerun bash $0 $OUT"
fi
