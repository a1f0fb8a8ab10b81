#!/usr/bin/env bash
# Sizes of the files each stage writes, for the README: the embedded model, and SmolLM2-135M when
# it is built (`python data/build_checkpoints.py`).  A Fisher file's and a direction file's size
# depend on the model, not on the sample; a surface file's on the grid, not on the model.
#   bash benchmarks/file_sizes.sh [OUT_DIR]        (default: a temporary folder, removed after)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-$(mktemp -d)}
[ -n "${1:-}" ] || trap 'rm -rf "$OUT"' EXIT
mkdir -p "$OUT"
L="python3 -m landscape.cli"
size() { printf '  %-58s %12s\n' "$1" "$(python3 -c "import os,sys; n = os.path.getsize(sys.argv[1])
print(f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n / 2**10:.1f} KiB')" "$2")"; }

measure() {  # NAME MODEL_ARGS...
    local name=$1; shift
    local d="$OUT/$name"; mkdir -p "$d"
    echo "$name:"
    $L fisher "$@" --max-samples 1 --seq-len 16 --batch-size 1 --threads 1 --quiet --out "$d/F.safetensors" >/dev/null 2>&1
    size "fisher (float32, any sample)" "$d/F.safetensors"
    for spec in all:float32 top:50:float32 top:5:float32 all:bfloat16; do
        local subset=${spec%:*} dtype=${spec##*:}
        local fisher_args=(); [ "$subset" = all ] || fisher_args=(--fisher "$d/F.safetensors")
        $L directions "$@" "${fisher_args[@]}" --subset "$subset" --dtype "$dtype" --threads 1 \
            --out "$d/dir_${subset/:/}_$dtype.h5" >/dev/null 2>&1
        size "directions --subset $subset --dtype $dtype (2 directions)" "$d/dir_${subset/:/}_$dtype.h5"
    done
}

measure embedded
if M=$($L where --checkpoint smollm2-135m-instruct 2>/dev/null); then
    measure smollm2-135m-instruct --model "$M"
else
    echo "smollm2-135m-instruct: not built (python data/build_checkpoints.py); skipped"
fi

echo "surface files (embedded model, 4 x 128-token sample):"
d="$OUT/embedded"
for grid in -1:1:21; do
    $L surface --directions "$d/dir_all_float32.h5" --max-samples 4 --batch-size 4 --threads 1 \
        --x="$grid" --y="$grid" --out "$d/s_${grid//[:-]/_}.h5" >/dev/null 2>&1
    size "surface 2D $grid squared" "$d/s_${grid//[:-]/_}.h5"
done
