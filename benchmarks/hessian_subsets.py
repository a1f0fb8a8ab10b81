"""Curvature of the demo's Fisher subsets: Hessian top eigenvalue and trace for all / top-50% / bottom-50%.

The demo's setting: the embedded model, its Fisher (2048 samples x 128 tokens, seed 0: the demo's
``fisher.safetensors``, or ``landscape fisher --max-samples 2048 --seq-len 128 --batch-size 16
--seed 0``), and the evaluation sample of its surfaces (32 samples x 128 tokens, seed 1).  The
coordinates are the perturbable elements (weight matrices and embeddings; biases and LayerNorm
are not perturbed by the demo's directions), so top:50 and bottom:50 split 'all' in two halves
of the same size and the restricted Hessians P·H·P are those of the surfaces' subspaces.

Prints one row per subset and writes the CSV (``figures/hessian_all_top_bottom.csv``).  Each
subset's trace and eigenpair journals sit next to the CSV while it runs, so a killed run resumes.

    python benchmarks/hessian_subsets.py --fisher /tmp/demo/fisher.safetensors --trace 100 \
        --out figures/hessian_all_top_bottom.csv
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape.curvature.report import hessian_report, remove_checkpoints, subset_mask  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.files import write_csv  # noqa: E402
from landscape.fisher import load_fisher  # noqa: E402
from landscape.models import load_model  # noqa: E402

SUBSETS = ("all", "top:50", "bottom:50")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fisher", required=True, help="the demo's Fisher file")
    parser.add_argument("--out", default="figures/hessian_all_top_bottom.csv")
    parser.add_argument("--trace", type=int, default=100, help="Hutchinson probes per subset (default 100)")
    parser.add_argument("--top", type=int, default=1, help="eigenpairs per subset (default 1)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-seed", type=int, default=1, help="the demo's surfaces use seed 1")
    parser.add_argument("--seed", type=int, default=0, help="Lanczos start vector and probes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(None)
    fisher, _ = load_fisher(args.fisher)
    batches = load_batches(loaded, max_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                           seed=args.sample_seed)
    settings = (f"embedded model; eval sample {args.samples}x{args.seq_len} tokens seed {args.sample_seed}; "
                f"Fisher {Path(args.fisher).name} (demo: 2048x128 seed 0); ignore biasbn; top-{args.top} Lanczos "
                f"tol {args.tol:g}; trace {args.trace} Rademacher probes; seed {args.seed}; "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    print(f"{'subset':<10} {'n_parameters':>13} {'top_eigenvalue':>15} {'trace':>11} {'± stderr':>9} "
          f"{'trace/param':>12} {'seconds':>8}", flush=True)
    for subset in SUBSETS:
        mask = subset_mask(loaded.model, fisher if subset != "all" else None, subset, seed=args.seed)
        prefix = Path(args.out).with_name(f".{Path(args.out).stem}.{subset.replace(':', '')}")
        start = time.perf_counter()
        report = hessian_report(loaded.model, batches, kind=loaded.kind, top=args.top, trace_samples=args.trace,
                                mask=mask, seed=args.seed, tol=args.tol, checkpoint=prefix, progress=True,
                                log=lambda line: print(line, flush=True) if line.startswith("warning") else None)
        seconds = time.perf_counter() - start
        n = report["provenance"]["n_coordinates"]
        row = {"subset": subset, "n_parameters": n, "top_eigenvalue": report["eigenvalues"][0],
               "trace": report["trace"]["mean"], "trace_stderr": report["trace"]["stderr"],
               "trace_per_parameter": report["trace"]["mean"] / n,
               "top_residual": report["eigenpairs"]["residuals"][0], "loss": report["loss"],
               "seconds": round(seconds, 1), "settings": settings}
        rows.append(row)
        print(f"{subset:<10} {n:>13,} {row['top_eigenvalue']:>15.6g} {row['trace']:>11.5g} "
              f"{row['trace_stderr']:>9.2g} {row['trace_per_parameter']:>12.4g} {seconds:>8.0f}", flush=True)
    write_csv(rows, args.out)
    for subset in SUBSETS:
        remove_checkpoints(Path(args.out).with_name(f".{Path(args.out).stem}.{subset.replace(':', '')}"))
    print(f"wrote {args.out}\nsettings: {settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
