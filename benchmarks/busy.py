"""Threads on a busy machine: a heavy slice of the demo, idle and beside a competing CPU-bound job,
with ``--threads auto`` against torch's default threads (``--threads 0``, the old behaviour).

The slice is the demo's own commands on the embedded model, each its own process as a user runs
them: ``fisher`` (stability-sized sample), ``directions --subset top:50``, and a 2D ``surface``.
The competing job is one busy-looping process per usable core (``--competitor spin``) or a torch
matmul loop with torch's default threads (``--competitor torch``); it starts before and stops after
each busy run.  Prints each run's wall time, the threads that ``auto`` chose, and the ratios:
busy/idle for auto (target <= 2) and busy-default/busy-auto.

    python benchmarks/busy.py                       # 24 min on the shared 2-core machine of results/busy.txt
    python benchmarks/busy.py --fisher-samples 256 --grid=-1:1:9 --competitor torch

Timings on a machine shared with other work are noisy; the loads before each run are printed.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIN = "while True: pass"
TORCH_LOOP = "import torch\na = torch.randn(512, 512)\nwhile True: a = (a @ a).tanh()"


def slice_commands(out: Path, args):
    """The demo's heavy stages on the embedded model, as command lines (without --threads)."""
    fisher, dirs, surface = out / "F.safetensors", out / "top50.h5", out / "s.h5"
    return [
        ["fisher", "--max-samples", str(args.fisher_samples), "--device", "cpu", "--out", str(fisher), "--quiet"],
        ["directions", "--fisher", str(fisher), "--subset", "top:50", "--out", str(dirs)],
        ["surface", "--directions", str(dirs), "--max-samples", str(args.eval_samples), "--device", "cpu",
         f"--x={args.grid}", f"--y={args.grid}", "--out", str(surface)],
    ]


def run_slice(threads: str, args) -> tuple:
    """(wall seconds of the whole slice, threads chosen per command) with ``--threads threads``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)  # the old behaviour is torch's default, not a caller's setting
    chosen = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for command in slice_commands(Path(tmp), args):
            probe = ("import sys, torch\nfrom landscape.cli import main\ncode = main(sys.argv[1:])\n"
                     "print('THREADS', torch.get_num_threads(), file=sys.stderr)\nsys.exit(code)")
            done = subprocess.run([sys.executable, "-c", probe, *command, "--threads", threads],
                                  env=env, capture_output=True, text=True, cwd=tmp)
            if done.returncode != 0:
                sys.exit(f"busy.py: `landscape {' '.join(command)}` failed:\n{done.stderr[-2000:]}")
            chosen += [line.split()[1] for line in done.stderr.splitlines() if line.startswith("THREADS ")]
        return time.perf_counter() - start, chosen


class Competitor:
    """One busy-looping process per usable core, or one torch loop with torch's default threads."""

    def __init__(self, kind: str, cores: int):
        self.kind, self.cores, self.procs = kind, cores, []

    def __enter__(self):
        code, count = (SPIN, self.cores) if self.kind == "spin" else (TORCH_LOOP, 1)
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        self.procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(count)]
        time.sleep(2.0)  # let it take the cores before the run measures how busy they are
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()
        return False


def _load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fisher-samples", type=int, default=128, help="sequences of 128 tokens for the Fisher")
    parser.add_argument("--eval-samples", type=int, default=16, help="sequences of the surface's sample")
    parser.add_argument("--grid", default="-1:1:7", help="MIN:MAX:NUM of both surface axes")
    parser.add_argument("--competitor", choices=("spin", "torch"), default="spin",
                        help="spin: one busy-looping process per usable core; torch: a matmul loop, default threads")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from landscape.runtime import usable_cores

    cores = len(usable_cores())
    print(f"slice: fisher ({args.fisher_samples} x 128 tokens) + directions top:50 + surface "
          f"({args.grid} squared, {args.eval_samples} x 128 tokens) on the embedded model; {cores} usable cores; "
          f"competitor: {args.competitor}", flush=True)
    times = {}
    for phase in ("idle", "busy"):
        for threads in ("auto", "0"):
            load = _load()
            if phase == "busy":
                with Competitor(args.competitor, cores):
                    seconds, chosen = run_slice(threads, args)
            else:
                seconds, chosen = run_slice(threads, args)
            times[phase, threads] = seconds
            name = "auto" if threads == "auto" else "default (--threads 0)"
            print(f"{phase:<5} {name:<22} {seconds:7.1f} s   threads per command {','.join(chosen)}   "
                  f"load before {load}", flush=True)
    print(f"auto:    busy/idle = {times['busy', 'auto'] / times['idle', 'auto']:.2f}  (target <= 2)")
    print(f"default: busy/idle = {times['busy', '0'] / times['idle', '0']:.2f}")
    print(f"busy:    default/auto = {times['busy', '0'] / times['busy', 'auto']:.2f}")
    print(f"idle:    default/auto = {times['idle', '0'] / times['idle', 'auto']:.2f}")


if __name__ == "__main__":
    main()
