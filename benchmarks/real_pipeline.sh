#!/usr/bin/env bash
# The README's "On a real model" pipeline on SmolLM2-135M-Instruct, one stage at a time, printing
# each stage's wall-clock seconds and peak RSS (GNU time). Writes into OUT (default out/real_pipeline).
# The checkpoint is built first if missing (data/build_checkpoints.py; no Hugging Face hub needed).
#
#     bash benchmarks/real_pipeline.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-out/real_pipeline}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
command -v /usr/bin/time > /dev/null || { echo "real_pipeline.sh: needs GNU time at /usr/bin/time" >&2; exit 2; }
smollm2_path() { python3 -m landscape.cli where --checkpoint smollm2-135m-instruct 2>/dev/null; }
M=$(smollm2_path) || { python3 data/build_checkpoints.py --only smollm2-135m-instruct && M=$(smollm2_path); }
mkdir -p "$OUT" && cd "$OUT"

stage() {  # stage NAME ARGS...: run `landscape ARGS` and print NAME, seconds, peak RSS
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o time.txt python3 -m landscape.cli "$@" > "$name.log" 2>&1 \
    || { cat "$name.log" >&2; exit 1; }
  awk -v name="$name" '{ printf "%-22s %7.1f s  %5.2f GiB peak RSS\n", name, $1, $2 / 1048576 }' time.txt
}

SAMPLE=(--max-samples 8 --seq-len 128 --batch-size 8)
GRID=(--x=-0.3:0.3:7 --y=-0.3:0.3:7)
stage fisher           fisher --model "$M" --max-samples 16 --seq-len 128 --batch-size 8 --quiet --overwrite --out F.safetensors
stage directions-top   directions --model "$M" --fisher F.safetensors --subset top:50 --overwrite --out top50.h5
stage directions-bottom directions --model "$M" --fisher F.safetensors --subset bottom:50 --overwrite --out bottom50.h5
rm -f top50_s.h5 bottom50_s.h5  # a fresh grid each time, so that the times are whole surfaces
stage surface-top      surface --model "$M" --directions top50.h5 "${SAMPLE[@]}" "${GRID[@]}" --out top50_s.h5
stage surface-bottom   surface --model "$M" --directions bottom50.h5 "${SAMPLE[@]}" "${GRID[@]}" --out bottom50_s.h5
stage compare          compare top50_s.h5 bottom50_s.h5 --labels top-50%,bottom-50% --kind contourf \
                               --out smollm2_top_bottom.png
stage schedule         schedule F.safetensors --model "$M" --out schedule.json
echo "sharpness ($OUT/smollm2_top_bottom.sharpness.csv):"
cat smollm2_top_bottom.sharpness.csv
