"""How much another torch thread count changes surface numbers (float sums in another order).

Evaluates the same 5x5 surface of the embedded model with 1 and with 2 threads in one process and
prints the largest relative difference and how many points differ:

    python benchmarks/thread_count_bits.py
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import directions, surface  # noqa: E402 (the repository first, as the other benchmarks)
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.models import load_model  # noqa: E402


def main():
    loaded = load_model(None)
    batches = load_batches(loaded, corpus=None, max_samples=16, seq_len=128, batch_size=8)
    axes = [directions.random_direction(loaded.model, seed=0, index=i) for i in (0, 1)]
    xs = ys = surface.parse_range("-1:1:5")
    grids = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        grids[threads] = surface.evaluate(loaded.model, axes, batches, xs, ys, kind=loaded.kind)
    relative = np.abs(grids[1] - grids[2]) / np.abs(grids[1])
    print(f"1 vs 2 threads, {relative.size} points of the embedded model's surface: largest relative "
          f"difference {relative.max():.2e}, {(relative > 0).sum()} point(s) differ")


if __name__ == "__main__":
    main()
