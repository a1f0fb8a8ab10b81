"""Benchmark: how far bfloat16 runs of ``fisher`` and ``surface`` are from float32 ones on one model.

The same framed samples and the same (float32, filter-normalized) directions are used for both
dtypes; the model is loaded once in float32 and once in bfloat16 (as ``--dtype bfloat16`` does).
Prints:
  * the stored Fisher tensors' dtype (float32 in both runs: per-sample products and sums are float32);
  * the top-K% overlap of the Fisher: the fraction of the float32 top-K% elements (ranked over all
    parameters together, as ``directions --subset top:K``) that are also in the bfloat16 top-K%;
  * the max absolute loss difference over a 2D grid, and the loss range of the grid for scale;
  * for the bfloat16 model, the same grid with the directions held in bfloat16 on the device (what
    ``surface`` does by default) against float32 directions streamed from the host
    (``--stream-directions``): the cost of keeping the directions in the model's dtype.

    python benchmarks/bf16_agreement.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct \\
        --samples 4 --seq-len 64 --grid 5
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import directions, surface  # noqa: E402
from landscape.data.corpus import describe_framing, load_batches  # noqa: E402
from landscape.fisher import compute_fisher  # noqa: E402
from landscape.models import load_model  # noqa: E402


def top_overlap(reference, other, percent):
    """Fraction of the reference's top-percent elements (global ranking) also in other's top-percent."""
    spec = f"top:{percent:g}"
    a, b = directions.fisher_mask(reference, spec), directions.fisher_mask(other, spec)
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return both / max(1, sum(int(m.sum()) for m in a.values()))


def run(model_dir, dtype, dirs, args):
    """(Fisher, surface grid, loss at the origin, seconds) of the model loaded in ``dtype``."""
    loaded = load_model(model_dir, dtype=dtype)
    batches = load_batches(loaded, args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.batch_size, bos=args.bos)
    if dirs is None:  # directions from the float32 weights, reused for bfloat16
        dirs, _ = directions.make_directions(loaded.model, dims=2, seed=args.seed)
    start = time.perf_counter()
    fisher = compute_fisher(loaded.model, batches, kind=loaded.kind)
    t_fisher = time.perf_counter() - start
    origin, _ = surface.loss_and_accuracy(loaded.model, batches, loaded.kind)
    axis = np.linspace(-args.range, args.range, args.grid)
    start = time.perf_counter()
    grid = surface.evaluate(loaded.model, dirs, batches, axis, axis, kind=loaded.kind)
    t_grid = time.perf_counter() - start
    streamed = None if dtype == "float32" else surface.evaluate(loaded.model, dirs, batches, axis, axis,
                                                                           kind=loaded.kind, stream=True)
    return loaded, dirs, fisher, (grid, streamed), origin, (t_fisher, t_grid)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a causal or masked LM folder (or hub id)")
    parser.add_argument("--corpus", default=None, help="default: the embedded corpus")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bos", default="auto", choices=("auto", "yes", "no"))
    parser.add_argument("--grid", type=int, default=5, help="points per axis of the 2D grid (default 5)")
    parser.add_argument("--range", type=float, default=0.5, help="the grid spans -R..R on both axes (0.5)")
    parser.add_argument("--top", default="1", help="comma-separated top-K%% for the overlap (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the directions")
    args = parser.parse_args(argv)

    loaded, dirs, f32, (z32, _), o32, t32 = run(args.model, "float32", None, args)
    _, _, fbf, (zbf, zbf_streamed), obf, tbf = run(args.model, "bfloat16", dirs, args)
    dtypes = sorted({str(t.dtype) for t in list(f32.values()) + list(fbf.values())})
    print(f"{args.model} ({loaded.kind}); {args.samples} samples x {args.seq_len} tokens, batch "
          f"{args.batch_size} ({describe_framing(loaded.tokenizer, args.bos)}); {args.grid}x{args.grid} grid "
          f"over [-{args.range:g}, {args.range:g}]^2, directions seed {args.seed}")
    print(f"seconds float32 / bfloat16: Fisher {t32[0]:.1f} / {tbf[0]:.1f}, grid {t32[1]:.1f} / {tbf[1]:.1f}")
    print(f"Fisher tensors stored as: {', '.join(dtypes)}")
    for percent in (float(p) for p in args.top.split(",")):
        print(f"Fisher top-{percent:g}% overlap (bf16 vs float32): {top_overlap(f32, fbf, percent):.4f}")
    diff = np.abs(zbf - z32)
    print(f"loss at the origin: float32 {o32:.6f}, bfloat16 {obf:.6f} (|diff| {abs(obf - o32):.4f})")
    print(f"grid loss: float32 range {z32.min():.4f} .. {z32.max():.4f}; max |bf16 - float32| = "
          f"{diff.max():.4f} (mean {diff.mean():.4f}, max relative {(diff / np.abs(z32)).max():.2e})")
    held = np.abs(zbf - zbf_streamed)
    print(f"bfloat16 model, directions held in bf16 vs float32 (streamed): max |diff| = {held.max():.4f} "
          f"(mean {held.mean():.4f}, max relative {(held / np.abs(zbf_streamed)).max():.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
