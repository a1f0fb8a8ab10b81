"""Benchmark: ``hessian --shard-size K`` under torchrun gives the numbers of one process, on a real checkpoint.

Runs ``hessian --hvp difference`` (the product a model sharded with FSDP2 takes) twice through the
command line, once in one process and once under ``torch.distributed.run`` with N ranks and
``--shard-size K`` (CPU and gloo unless ``--device cuda``), and prints the eigenvalues and the trace
of both, their relative differences, the top eigenvectors' largest difference, and each run's seconds.
With ``--exact``, a third run in one process with the exact product (``--hvp exact``, no trace) and
the difference product's top eigenvalues' relative difference from its.

    python benchmarks/sharded_hessian.py \\
        --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct --nproc 2 --shard-size 2
"""

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

from sharded_agreement import landscape


def _first_direction(path):
    import h5py
    import numpy as np

    with h5py.File(path, "r") as handle:
        return {key: np.asarray(handle["xdirection"][key]) for key in handle["xdirection"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local from_pretrained folder")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=2, help="sequences in the sample")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--top", type=int, default=1)
    parser.add_argument("--trace", type=int, default=4, help="Hutchinson probes")
    parser.add_argument("--tol", default="1e-3")
    parser.add_argument("--max-iter", default="60")
    parser.add_argument("--exact", action="store_true", help="also the exact product's eigenvalues (one process)")
    args = parser.parse_args(argv)

    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="landscape-sharded-hessian-"))
    common = ["hessian", "--model", args.model, "--max-samples", args.samples, "--seq-len", args.seq_len,
              "--batch-size", args.samples, "--device", args.device, "--hvp", "difference", "--top", args.top,
              "--trace", args.trace, "--tol", args.tol, "--max-iter", args.max_iter, "--quiet"]
    # The sharded run first: the children's peak RSS only grows, so each reading is that run's (or more).
    runs = {"sharded": (args.nproc, ["--shard-size", args.shard_size]), "one": (1, [])}
    if args.exact:
        runs["exact"] = (1, ["--hvp", "exact", "--trace", 0])  # the later flags win
    seconds, reports, peaks = {}, {}, {}
    for tag, (nproc, extra) in runs.items():
        seconds[tag] = landscape([*common, *extra, "--out", work / f"{tag}.json", "--vectors", work / f"{tag}.h5"],
                                 nproc)
        peaks[tag] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        reports[tag] = json.loads((work / f"{tag}.json").read_text())
    one, sharded = reports["one"], reports["sharded"]
    print(f"{args.model}, float32 on {args.device}; {args.samples} samples x {args.seq_len} tokens; hessian --hvp "
          f"difference --top {args.top} --trace {args.trace} --tol {args.tol}; {args.nproc} ranks, shard size "
          f"{args.shard_size}; {one['provenance']['n_coordinates']:,} coordinates")
    for tag, report in reports.items():
        trace = report.get("trace") or {}
        print(f"{tag}: eigenvalues {report['eigenvalues']} ({report['eigenpairs']['products']} products, "
              f"residuals {report['eigenpairs']['residuals']}), trace {trace.get('mean', float('nan')):.9g} "
              f"± {trace.get('stderr', float('nan')):.3g}, {seconds[tag]:.1f} s, largest process peak RSS "
              f"{peaks[tag]:.2f} GiB")
    values = np.asarray(one["eigenvalues"])
    print("eigenvalues: max relative difference "
          f"{float(np.max(np.abs(np.asarray(sharded['eigenvalues']) - values) / np.abs(values))):.2e}")
    trace = abs(sharded["trace"]["mean"] - one["trace"]["mean"]) / abs(one["trace"]["mean"])
    print(f"trace: relative difference {trace:.2e}")
    a, b = _first_direction(work / "one.h5"), _first_direction(work / "sharded.h5")
    print(f"top eigenvector: max absolute difference {max(float(np.abs(a[k] - b[k]).max()) for k in a):.2e} "
          f"(unit norm over {sum(v.size for v in a.values()):,} elements)")
    if args.exact:
        exact = np.asarray(reports["exact"]["eigenvalues"])
        for tag in ("one", "sharded"):
            off = np.abs(np.asarray(reports[tag]["eigenvalues"]) - exact) / np.abs(exact)
            print(f"{tag} (difference) against exact: eigenvalues' max relative difference {float(off.max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
