"""Benchmark: the gradient-only Hessian-vector product's error against the exact one on a real model.

``--hvp difference`` (docs/curvature.md) forms H·v from four gradients; its error is tested on the
tiny test models (tests/test_hvp_difference.py).  This prints it on a real checkpoint: for random
Gaussian vectors v, the relative error ‖H_diff·v − H·v‖ / ‖H·v‖, the two quadratic forms vᵀHv, and
each product's seconds (noise on a shared CPU; the first exact product includes its graph's build).
With ``--lanczos C ...`` it also prints the error along the second Lanczos vector from the seeded
Gaussian start vector v₁ of ``top_eigenpairs`` (v₂ ∝ H·v₁ − α₁v₁, every parameter a coordinate;
it gathers on fewer coordinates than a random vector) and along the first random vector, with the
step constant ``difference.DIFFERENCE_STEP`` set to each C in turn.  With ``--rules`` it prints, along the
mean loss's gradient, 2 random vectors and the exact product's Lanczos vectors 1-3, the error at 2^-K
times the library's step for each ``--grid K`` and how spread each vector is (the candidates' steps over
the library's; ``benchmarks/results/hvp_difference_rules.txt``).  ``--model tiny:NAME`` takes one of the
test suite's tiny models (tests/conftest.py: bert, gpt2, llama, t5 with gated GELU).  Norms and inner
products are summed in float64 (``quadratic.block_dot``).

    python benchmarks/hvp_difference_error.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct
    python benchmarks/hvp_difference_error.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct \
        --samples 1 --trials 0 --lanczos 2e-4 5e-5 1e-5
    python benchmarks/hvp_difference_error.py --model tiny:t5 --samples 8 --seq-len 32 --batch-size 4 \
        --trials 0 --threads 1 --rules --grid -1 0 1
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
    parser.add_argument("--batch-size", type=int, default=None, help="default: --samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lanczos", type=float, nargs="*", default=[], metavar="C",
                        help="step constants to measure along the second Lanczos vector")
    parser.add_argument("--rules", action="store_true",
                        help="the error along the gradient, 2 random v and Lanczos vectors 1..3 at (--grid) "
                             "multiples of the library's step, and how spread each vector is")
    parser.add_argument("--grid", type=int, nargs="*", default=[0], metavar="K",
                        help="with --rules: measure at 2^-K times the library's step, for each K")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = _tiny(args.model[5:]) if args.model and args.model.startswith("tiny:") else load_model(args.model)
    batches = load_batches(loaded, corpus=None, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.batch_size or args.samples, seed=0)
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
    if args.rules:
        _compare_rules(exact, difference, args.grid)


def _tiny(name: str):
    """One of the test suite's tiny float32 models (tests/conftest.py), as tests/test_hvp_difference.py loads it."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import conftest
    from test_hvp_difference import _smooth_t5

    folder = Path(tempfile.mkdtemp()) / name
    getattr(conftest, f"_save_{name}")(folder)
    return _smooth_t5(folder) if name == "t5" else load_model(str(folder))


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
            along_v2 = difference_module.step(difference.space.params, v2, torch.finfo(torch.float32).eps)
            print(f"  c {c:g} (step {along_v2:.3g} along v2): relative error along v2 "
                  f"{errors['v2']:.3e} (v2'Hv2 {block_dot(v2, got['v2']):.6g}), along random v {errors['random']:.3e}",
                  flush=True)
    finally:
        difference_module.DIFFERENCE_STEP = default

def _mean_gradient(op) -> torch.Tensor:
    """The flat gradient of the token-weighted mean loss over the operator's batches."""
    from landscape.data.objectives import sequence_losses

    total, tokens = 0.0, 0.0
    with op, torch.enable_grad():
        for batch in op.batches:
            losses = sequence_losses(op.model, batch, op.kind)
            total = total + losses.loss_sum.sum()
            tokens += float(losses.n_tokens.sum())
        return op.space.flatten(torch.autograd.grad(total / tokens, op.space.params)).detach()


def _lanczos_vectors(exact, count: int) -> list:
    """The first ``count`` Lanczos vectors of the exact product from top_eigenpairs' seeded start vector
    (full reorthogonalization, float64 coefficients), and their exact products."""
    vectors = [_random_unit(exact.shape[0], _generator(0, 1), "cpu")]
    products = []
    for j in range(count):
        products.append(exact @ vectors[j])
        if j + 1 == count:
            break
        w = products[j].clone()
        for _ in range(2):
            for u in vectors:
                w -= block_dot(u, w) * u
        vectors.append(w / _norm(w))
    return vectors, products


def _vector_stats(space, v: torch.Tensor) -> dict:
    """How v is spread, and each candidate rule's ε over the library's (``difference.step``) at the same constant:
    peak ‖v‖_∞·√n/‖v‖ (about 4.5-6 for a Gaussian v), pr the participation ratio ‖v‖⁴/(n·Σv⁴) (1/3 Gaussian),
    norm the old rule's ε·‖v‖ = c·(1 + ‖θ‖), tensor c·min over tensors of max(RMS(θ_t), RMS(θ))/‖v_t‖_∞."""
    blocks = space.unflatten(v)
    thetas = [p.detach().double() for p in space.params]
    n = sum(t.numel() for t in thetas)
    norm_theta = sum(float(t.square().sum()) for t in thetas) ** 0.5
    rms = (1 + norm_theta) / n ** 0.5
    norm_v, peak = _norm(v), float(v.abs().max())
    rule = rms / peak  # the library's rule at constant 1
    tensor = min(max(float(t.square().mean()) ** 0.5, rms) / float(b.abs().max())
                 for t, b in zip(thetas, blocks) if float(b.abs().max()) > 0)
    return {"peak": peak * n**0.5 / norm_v, "pr": norm_v**4 / float(v.double().pow(4).sum()) / n,
            "norm": (1 + norm_theta) / norm_v / rule, "tensor": tensor / rule}


def _compare_rules(exact, difference, grid: list) -> None:
    """Per vector (the mean loss's gradient, 2 random, Lanczos 1..3): the relative error at ε = 2^-k times the
    library's step (``difference.step``) for each k of ``grid``, and how the vector is spread."""
    generator = torch.Generator().manual_seed(0)
    named = {"gradient": _mean_gradient(exact)}
    for i in range(2):
        named[f"random{i}"] = torch.randn(exact.shape[0], generator=generator)
    with exact:
        products = {name: exact @ v for name, v in named.items()}
        lanczos, lanczos_products = _lanczos_vectors(exact, 3)
    for i, (v, hv) in enumerate(zip(lanczos, lanczos_products)):
        named[f"lanczos{i + 1}"], products[f"lanczos{i + 1}"] = v, hv
    space = difference.space
    theta = sum(float(p.detach().double().square().sum()) for p in space.params) ** 0.5
    rule = difference_module.step
    eps = torch.finfo(torch.float32).eps
    print(f"|theta| {theta:.6g}, n {exact.shape[0]}; relative error at eps = 2^-k x the library's step "
          f"(c {difference_module.DIFFERENCE_STEP:g}), k = {' '.join(map(str, grid))}")
    worst = {k: 0.0 for k in grid}
    try:
        for name, v in named.items():
            stats = _vector_stats(space, v)
            at = rule(space.params, v, eps)
            errors = []
            for k in grid:
                difference_module.step = lambda params, w, e, shards=None, fixed=at * 2.0**-k: fixed
                with difference:
                    got = difference @ v
                errors.append(_norm(got - products[name]) / _norm(products[name]))
                worst[k] = max(worst[k], errors[-1])
                difference_module.step = rule
            print(f"{name}: vHv {block_dot(v, products[name]):.6g}, |Hv|/|v| {_norm(products[name]) / _norm(v):.4g}, "
                  + ", ".join(f"{key} {value:.3g}" for key, value in stats.items())
                  + "; errors " + " ".join(f"{e:.2e}" for e in errors), flush=True)
    finally:
        difference_module.step = rule
    print("largest: " + ", ".join(f"k={k} {e:.2e}" for k, e in worst.items()))


if __name__ == "__main__":
    main()
