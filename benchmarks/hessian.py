"""Benchmark: seconds per Hessian-vector product against a plain backward of the same loss.

On the embedded model (or ``--model DIR``) and 16 samples x 128 tokens of the embedded corpus, in
one run, alternating the three so that machine load hits them alike:
  (a) plain     - ``loss.backward()`` of the token-weighted mean cross-entropy (the model's own
                  attention implementation), gradients dropped after each;
  (b) Hv        - ``curvature.HessianOperator.matvec`` as Lanczos, Hutchinson and SLQ use it: the
                  first-order graphs are cached, so a product is one second-order backward;
  (c) Hv fresh  - the same with ``cache_bytes=0``: forward, backward with graph and double
                  backward every product (the cost of the first product, or of a run whose
                  graphs do not fit the cache budget).
Checks that (b) and (c) agree, prints median seconds, the ratios (target (b)/(a) <= 2.5 on CPU)
and peak memory; ``--top`` also times ``curvature.top_eigenpairs(k=1)``.

    python benchmarks/hessian.py                 # embedded model and corpus (the embedded model ships with the package)
    python benchmarks/hessian.py --model DIR --top
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import PeakMemory  # noqa: E402 (this folder is sys.path[0] when run as a script)

from landscape import curvature  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.data.objectives import sequence_losses  # noqa: E402
from landscape.models import load_model  # noqa: E402


def count_tokens(model, batches, kind):
    """Σ n_tokens: the loss's denominator."""
    with torch.no_grad():
        return sum(float(sequence_losses(model, b, kind).n_tokens.sum()) for b in batches)


def plain_backward(model, batches, kind, tokens):
    """(a) The gradient of Σ loss_sum / Σ n_tokens, one backward per batch (as the products go
    batch by batch); gradients are dropped afterwards.  Returns the loss."""
    loss = 0.0
    for batch in batches:
        part = sequence_losses(model, batch, kind).loss_sum.sum() / tokens
        part.backward()
        loss += float(part.detach())
    for p in model.parameters():
        p.grad = None
    return loss


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a from_pretrained folder or hub id (default: embedded)")
    parser.add_argument("--corpus", default=None, help="default: the embedded corpus")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="alternations of (a), (b), (c); medians reported")
    parser.add_argument("--top", action="store_true", help="also time top_eigenpairs(k=1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))

    loaded = load_model(args.model, device=device)
    model, kind = loaded.model, loaded.kind
    batches = load_batches(loaded, args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.batch_size, device=device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    attention = model.config._attn_implementation
    print(f"model {loaded.source} ({type(model).__name__}, {n_params / 1e6:.2f}M trainable parameters, "
          f"{attention} attention); {args.samples} samples x {args.seq_len} tokens ({n_tokens} targets), "
          f"batch {args.batch_size}, device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    cached = curvature.HessianOperator(model, batches, kind=kind)
    fresh = curvature.HessianOperator(model, batches, kind=kind, cache_bytes=0)
    v = torch.randn(cached.dim, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with PeakMemory(device) as memory:
            first, t_first = timed(lambda: cached.matvec(v), device)  # builds the cache
    for w in caught:
        print(f"warning: {w.message}")
    tokens = count_tokens(model, batches, kind)
    plain_backward(model, batches[:1], kind, tokens)  # warm-up
    times = {"plain": [], "cached": [], "fresh": []}
    warnings.simplefilter("ignore")  # the attention warning was printed above
    for _ in range(args.repeats):
        times["plain"].append(timed(lambda: plain_backward(model, batches, kind, tokens), device)[1])
        hv, t = timed(lambda: cached.matvec(v), device)
        times["cached"].append(t)
        hv_fresh, t = timed(lambda: fresh.matvec(v), device)
        times["fresh"].append(t)
    median = {k: statistics.median(t) for k, t in times.items()}
    gap = float((hv - hv_fresh).norm() / hv_fresh.norm())

    print(f"{'method':<40}{'median s':>10}{'min s':>9}{'x plain':>9}")
    rows = [("(a) plain loss.backward", "plain"), ("(b) Hv, cached first-order graph", "cached"),
            ("(c) Hv fresh (forward + double backward)", "fresh")]
    for label, key in rows:
        print(f"{label:<40}{median[key]:>10.3f}{min(times[key]):>9.3f}{median[key] / median['plain']:>9.2f}")
    print(f"first product (builds the cache): {t_first:.3f} s; cache {cached._used_bytes / 2**20:.0f} MiB of "
          f"{cached.cache_bytes / 2**20:.0f} MiB budget; peak memory of the first product "
          f"{memory.peak_mb:.0f} MB ({'CUDA allocator' if device.type == 'cuda' else 'process RSS'})")
    print(f"|(b) - (c)| / |(c)| = {gap:.1e}; vᵀHv/vᵀv = {float(v.to(hv) @ hv) / float(v @ v):.4g}")
    print(f"ratio (b)/(a) = {median['cached'] / median['plain']:.2f}  (target <= 2.5)")
    print(f"ratio (c)/(a) = {median['fresh'] / median['plain']:.2f}")
    cached.clear()

    if args.top:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hessian = curvature.HessianOperator(model, batches, kind=kind)
            (values, _, info), t_top = timed(lambda: curvature.top_eigenpairs(hessian, k=1, return_info=True), device)
        print(f"top eigenvalue {values[0]:.6g} in {t_top:.1f} s: {info.products} products "
              f"({t_top / info.products:.3f} s each), relative residual {info.residuals[0]:.1e} "
              f"(tol {info.tol:g}), converged {info.converged}")
    return 0 if gap < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
