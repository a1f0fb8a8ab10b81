"""Benchmark: the gradient-only Hessian-vector product's error against the exact one on a real model.

``--hvp difference`` (docs/curvature.md) forms H·v from four gradients; its error is tested on the
tiny test models (tests/test_hvp_difference.py).  This prints it on a real checkpoint: for random
Gaussian vectors v, the relative error ‖H_diff·v − H·v‖ / ‖H·v‖, the two quadratic forms vᵀHv, and
each product's seconds (noise on a shared CPU; the first exact product includes its graph's build).

    python benchmarks/hvp_difference_error.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import curvature  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.models import load_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2, help="random vectors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    batches = load_batches(loaded, corpus=None, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.samples, seed=0)
    exact = curvature.HessianOperator(loaded.model, batches, kind=loaded.kind)
    difference = curvature.HessianOperator(loaded.model, batches, kind=loaded.kind, hvp="difference")
    generator = torch.Generator().manual_seed(0)
    print(f"{args.model or 'embedded model'}: {exact.shape[0]} parameters, {args.samples} x {args.seq_len} tokens")
    for trial in range(args.trials):
        v = torch.randn(exact.shape[0], generator=generator)
        start = time.perf_counter()
        hv = exact @ v
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        hv_difference = difference @ v
        difference_s = time.perf_counter() - start
        error = float((hv_difference - hv).norm() / hv.norm())
        print(f"v{trial}: relative error {error:.3e}  vHv exact {float(v @ hv):.6g}, difference "
              f"{float(v @ hv_difference):.6g}  ({exact_s:.0f} s exact, {difference_s:.0f} s difference)", flush=True)


if __name__ == "__main__":
    main()
