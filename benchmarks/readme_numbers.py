"""The README's measured numbers, as the README prints them: the file-size table, the demo's time and
the test suite's counts and times.

* Sizes: the files the README's pipeline writes ("On a real model": a Fisher of 16 sequences of
  128 tokens, then directions from it), on the embedded model and, when it is built
  (``python data/build_checkpoints.py``), SmolLM2-135M-Instruct.  A masked direction file's size
  depends on its mask, and so on the Fisher's sample: these are the sizes at the README's sample.
  ``tests/test_readme_numbers.py`` recomputes the embedded model's column.
* The demo: ``landscape demo`` in a temporary folder, wall time, with the load average before and
  after (the README quotes an idle machine).
* Tests: the summary line(s) of pytest logs you give (a whole run, then the fast tier), read, not rerun.

    python benchmarks/readme_numbers.py                      # the size table (2-3 min idle with SmolLM2)
    python benchmarks/readme_numbers.py --demo               # and the demo's time (about 4 min idle)
    python benchmarks/readme_numbers.py --no-sizes --pytest-log full.log --pytest-log fast.log
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The README's real-model pipeline: `landscape fisher --max-samples 16 --seq-len 128 --batch-size 8`.
FISHER_SAMPLE = dict(max_samples=16, seq_len=128, batch_size=8)
SURFACE_GRID = "-1:1:21"
# (README row label, subset, dtype) of the direction files, 2 directions each.
DIRECTION_ROWS = [
    ("directions, 2, dense float32 (`directions`)", "all", "float32"),
    ("directions, 2, `--subset top:50`", "top:50", "float32"),
    ("directions, 2, `--subset top:5`", "top:5", "float32"),
    ("directions, 2, dense `--dtype bfloat16`", "all", "bfloat16"),
]
FISHER_ROW = "Fisher (`fisher`)"
SURFACE_ROW = "surface, 2D, 21 × 21 (`surface`)"
SMOLLM2 = "smollm2-135m-instruct"


def human_size(size: int) -> str:
    """Bytes as the README writes them: MiB to one decimal from 1 MiB, else KiB to one decimal."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def measure_sizes(model: Optional[str], out: Path, surface: bool = True) -> Dict[str, int]:
    """{README row label: bytes} of the files the README's pipeline writes for ``model`` (None: embedded).

    One thread, so that the Fisher, and the masks ranked from it, are the same on every machine.
    """
    from landscape import (
        DirectionsSettings,
        FisherSettings,
        GridSpec,
        ModelSpec,
        SampleSpec,
        SurfaceSettings,
        make_directions,
        run_fisher,
        run_surface,
    )

    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(model, threads="1")
    fisher = out / "F.safetensors"
    run_fisher(FisherSettings(spec, SampleSpec(**FISHER_SAMPLE)), out=fisher, progress=False, overwrite=True)
    sizes = {FISHER_ROW: fisher.stat().st_size}
    for label, subset, dtype in DIRECTION_ROWS:
        path = out / f"d_{subset.replace(':', '')}_{dtype}.h5"
        make_directions(DirectionsSettings(ModelSpec(model, threads="1", dtype=dtype), dims=2, subset=subset,
                                           fisher=None if subset == "all" else str(fisher)),
                        out=path, overwrite=True, progress=False)
        sizes[label] = path.stat().st_size
    if surface:  # a surface file's size follows its grid, not the model or the sample: a short sample
        path = out / "s.h5"
        run_surface(SurfaceSettings(str(out / "d_all_float32.h5"), spec, SampleSpec(max_samples=4, seq_len=16,
                                                                                      batch_size=4),
                                    GridSpec(x=SURFACE_GRID, y=SURFACE_GRID)),
                    out=path, overwrite=True, progress=False)
        sizes[SURFACE_ROW] = path.stat().st_size
    return sizes


def size_table(embedded: Dict[str, int], smollm2: Optional[Dict[str, int]]) -> str:
    """The README's size table (markdown)."""
    lines = ["| file | embedded model (1.9M parameters) | SmolLM2-135M |", "|---|---|---|"]
    for label in [FISHER_ROW, *(row[0] for row in DIRECTION_ROWS), SURFACE_ROW]:
        other = "the same" if label == SURFACE_ROW else (human_size(smollm2[label]) if smollm2 else "(not built)")
        lines.append(f"| {label} | {human_size(embedded[label])} | {other} |")
    return "\n".join(lines)


def pytest_summary(log: str) -> Dict[str, float]:
    """The counts and seconds of a pytest log's last summary line ("== 741 passed, 1 skipped in 121.3s ==")."""
    lines = [line for line in log.splitlines() if re.search(r"\b(passed|failed|error)\b.* in [\d.]+s", line)]
    if not lines:
        raise ValueError("no pytest summary line (\"N passed ... in S s\") in the log")
    line = lines[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|"
                                                     r"xpassed)", line)}
    counts["seconds"] = float(re.search(r" in ([\d.]+)s", line).group(1))
    return counts


def minutes(seconds: float) -> str:
    """'16 min 13 s' (or '52 s' under a minute)."""
    whole = int(round(seconds))
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


def describe_tests(summary: Dict[str, float]) -> str:
    """A pytest summary as the README words it."""
    ran = sum(int(summary.get(k, 0)) for k in ("passed", "failed", "skipped", "error", "errors", "xfailed",
                                                "xpassed"))
    parts = [f"{int(summary[k])} {k}" for k in ("passed", "failed", "skipped", "deselected") if summary.get(k)]
    return f"{ran} tests in {minutes(summary['seconds'])} ({', '.join(parts)})"


def time_demo() -> float:
    """Wall seconds of ``landscape demo`` in a fresh temporary folder."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                       if p]))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "landscape.cli", "demo", "--quiet", "--out", str(Path(tmp) / "demo")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def _load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-sizes", action="store_true", help="skip the size table")
    parser.add_argument("--demo", action="store_true", help="time `landscape demo` (minutes)")
    parser.add_argument("--pytest-log", action="append", default=[], metavar="LOG",
                        help="a pytest log whose summary line to report (repeatable: the whole suite, the fast tier)")
    args = parser.parse_args(argv)
    if not args.no_sizes:
        from landscape.datahome import built_checkpoints

        with tempfile.TemporaryDirectory() as tmp:
            embedded = measure_sizes(None, Path(tmp) / "embedded")
            model = built_checkpoints().get(SMOLLM2)
            smollm2 = measure_sizes(str(model), Path(tmp) / SMOLLM2, surface=False) if model else None
        sample = ", ".join(f"{k} {v}" for k, v in FISHER_SAMPLE.items())
        print(f"file sizes (Fisher sample: {sample}; directions from that Fisher):")
        print(size_table(embedded, smollm2))
    if args.demo:
        before = _load()
        seconds = time_demo()
        print(f"landscape demo: {minutes(seconds)} ({before} before, {_load()} after)")
    for log in args.pytest_log:
        print(f"{log}: {describe_tests(pytest_summary(Path(log).read_text(errors='replace')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
