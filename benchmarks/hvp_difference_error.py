"""Benchmark: the gradient-only Hessian-vector product's error against the exact one on a real model.

``--hvp difference`` (docs/curvature.md) forms H·v from four gradients; its error is tested on the
tiny test models (tests/test_hvp_difference.py).  This prints it on a real checkpoint: for random
Gaussian vectors v, the relative error ‖H_diff·v − H·v‖ / ‖H·v‖, the two quadratic forms vᵀHv, and
each product's seconds (noise on a shared CPU; the first exact product includes its graph's build).
With ``--lanczos C ...`` it also prints the error along the second Lanczos vector from the seeded
Gaussian start vector v₁ of ``top_eigenpairs`` (v₂ ∝ H·v₁ − α₁v₁, every parameter a coordinate;
it gathers on fewer coordinates than a random vector) and along the first random vector, with the
step constant ``difference.DIFFERENCE_STEP`` set to each C in turn.  Norms and inner products are
summed in float64 (``quadratic.block_dot``).

    python benchmarks/hvp_difference_error.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct
    python benchmarks/hvp_difference_error.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct \
        --samples 1 --trials 0 --lanczos 2e-4 5e-5 1e-5
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import curvature  # noqa: E402
from landscape.curvature import difference as difference_module  # noqa: E402
from landscape.curvature.lanczos import _generator, _random_unit  # noqa: E402
from landscape.curvature.quadratic import block_dot  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.models import load_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--trials", type=int, default=2, help="random vectors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lanczos", type=float, nargs="*", default=[], metavar="C",
                        help="step constants to measure along the second Lanczos vector")
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
        error = _norm(hv_difference - hv) / _norm(hv)
        print(f"v{trial}: relative error {error:.3e}  vHv exact {block_dot(v, hv):.6g}, difference "
              f"{block_dot(v, hv_difference):.6g}  ({exact_s:.0f} s exact, {difference_s:.0f} s difference)",
              flush=True)
    if args.lanczos:
        _along_lanczos(exact, difference, args.lanczos)


def _norm(w) -> float:
    return block_dot(w, w) ** 0.5


def _along_lanczos(exact, difference, steps) -> None:
    """Per step constant, the error along v₂ (the second Lanczos vector from the seed-0 start vector) and along
    a random Gaussian vector (seed 0, the first of the trials)."""
    with exact:
        v1 = _random_unit(exact.shape[0], _generator(0, 1), "cpu")
        h1 = exact @ v1
        w = h1 - block_dot(v1, h1) * v1
        random = torch.randn(exact.shape[0], generator=torch.Generator().manual_seed(0))
        vectors = {"v2": w / _norm(w), "random": random}
        products = {name: exact @ v for name, v in vectors.items()}
    theta = sum(float(p.detach().double().square().sum()) for p in difference.space.params) ** 0.5
    v2, h2 = vectors["v2"], products["v2"]
    print(f"v2 (second Lanczos vector): v2'Hv2 exact {block_dot(v2, h2):.6g}; |theta| {theta:.6g}")
    default = difference_module.DIFFERENCE_STEP
    try:
        for c in steps:
            difference_module.DIFFERENCE_STEP = c
            with difference:
                got = {name: difference @ v for name, v in vectors.items()}
            errors = {name: _norm(got[name] - products[name]) / _norm(products[name]) for name in vectors}
            print(f"  c {c:g} (step {c * (1 + theta):.3g} along a unit vector): relative error along v2 "
                  f"{errors['v2']:.3e} (v2'Hv2 {block_dot(v2, got['v2']):.6g}), along random v {errors['random']:.3e}",
                  flush=True)
    finally:
        difference_module.DIFFERENCE_STEP = default

if __name__ == "__main__":
    main()
