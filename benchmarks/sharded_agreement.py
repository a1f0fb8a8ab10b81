"""Benchmark: a model sharded with FSDP2 gives the numbers of one process, on a real checkpoint.

Runs ``fisher``, ``directions --fisher F --subset top:K --orthogonalize`` and a 2D ``surface``
twice each through the command line, once in one process and once under ``torch.distributed.run``
with N ranks and ``--shard-size K`` (CPU and gloo unless ``--device cuda``), and prints the largest
relative difference of each result, the direction files' fingerprints, and every run's seconds.

    python benchmarks/sharded_agreement.py \\
        --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct --nproc 2 --shard-size 2
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def landscape(args, nproc=1):
    """Run ``landscape ARGS`` (under torchrun with ``nproc`` > 1); returns its seconds."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run(launcher + ["-m", "landscape.cli", *map(str, args)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"failed: landscape {' '.join(map(str, args))}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def max_relative(a, b):
    """max |a - b| / max |a| over every tensor of two {name: tensor} dicts (or two arrays)."""
    import numpy as np

    if isinstance(a, dict):
        return max(max_relative(a[n].numpy(), b[n].numpy()) for n in a)
    scale = float(np.abs(a).max())
    return float(np.abs(a - b).max()) / scale if scale else float(np.abs(a - b).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local from_pretrained folder")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--subset", default="top:5")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from landscape.surface import read_surface
    from landscape.surface.directions import load_directions

    sample = ["--max-samples", "8", "--seq-len", "64", "--batch-size", "8"]
    model = ["--model", args.model]
    shard = ["--shard-size", args.shard_size]
    work = Path(tempfile.mkdtemp(prefix="landscape-sharded-"))
    times = {}
    for tag, nproc, extra in (("one process", 1, []), (f"{args.nproc} ranks, shard size {args.shard_size}",
                                                        args.nproc, shard)):
        t = tag.split(",")[0].replace(" ", "_")
        times[tag] = [
            landscape(["fisher", *model, *sample, "--dtype", args.dtype, "--device", args.device, "--quiet",
                       "--out", work / f"F_{t}.safetensors", *extra], nproc),
            landscape(["directions", *model, "--fisher", work / "F_one_process.safetensors", "--subset", args.subset,
                       "--orthogonalize", "--dtype", args.dtype, "--out", work / f"D_{t}.h5", *extra], nproc),
            landscape(["surface", *model, *sample, "--dtype", args.dtype, "--device", args.device,
                       "--directions", work / "D_one_process.h5", "--x=-0.2:0.2:3", "--y=-0.2:0.2:3",
                       "--out", work / f"S_{t}.h5", *extra], nproc),
        ]
    sharded = f"{args.nproc}_ranks"
    fisher = max_relative(load_file(work / "F_one_process.safetensors"), load_file(work / f"F_{sharded}.safetensors"))
    (d1, a1), (d2, a2) = load_directions(work / "D_one_process.h5"), load_directions(work / f"D_{sharded}.h5")
    directions = max(max_relative(x, y) for x, y in zip(d1, d2))
    surface = max_relative(read_surface(work / "S_one_process.h5").z, read_surface(work / f"S_{sharded}.h5").z)
    print(f"{args.model}, {args.dtype} on {args.device}; 8 samples x 64 tokens; directions --subset {args.subset} "
          "--orthogonalize; surface 3x3 over [-0.2, 0.2]^2")
    print(f"Fisher: max relative difference {fisher:.2e}")
    print(f"directions: max relative difference {directions:.2e}; fingerprints {a1['fingerprint']} / "
          f"{a2['fingerprint']}")
    print(f"surface: max relative difference {surface:.2e}; loss at the origin "
          f"{read_surface(work / 'S_one_process.h5').z[1, 1]:.6f}")
    for tag, (t_fisher, t_dirs, t_surface) in times.items():
        print(f"seconds, {tag}: fisher {t_fisher:.1f}, directions {t_dirs:.1f}, surface {t_surface:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
