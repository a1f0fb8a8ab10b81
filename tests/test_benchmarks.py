"""The benchmarks the README and docs quote still run: each in its smallest form, on a tiny model.

They are scripts outside the package, so a change of a library signature breaks them silently
(``benchmarks/surface.py --model`` did, after the held-out sample came in); here each one runs
end to end and prints its comparison.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--samples", "2", "--seq-len", "8", "--batch-size", "2"]


@pytest.mark.slow  # each runs a benchmark script in its own process
@pytest.mark.parametrize("script, args, printed", [
    ("surface.py", [*SMALL, "--rounds", "1"], "median paired ratio"),
    ("fisher.py", [*SMALL, "--rounds", "1"], "median paired ratio"),
    ("hessian.py", [*SMALL, "--repeats", "1"], "ratio (b)/(a)"),
    ("bf16_agreement.py", [*SMALL, "--grid", "3"], "Fisher top-1% overlap"),
    ("bf16_hessian.py", [*SMALL, "--threads", "1"], "vs float32 twin: loss"),
    ("critical_sharpness.py", [*SMALL, "--max-iter", "10", "--threads", "1"], "Rayleigh / top eigenvalue"),
    ("numerics.py", SMALL, "every tensor in float16"),
])
def test_benchmark_runs_and_prints_its_comparison(script, args, printed, tiny_gpt2_dir, tiny_corpus_file):
    corpus = [] if script == "fisher.py" else ["--corpus", str(tiny_corpus_file)]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--model", str(tiny_gpt2_dir),
                             *corpus, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert printed in result.stdout
