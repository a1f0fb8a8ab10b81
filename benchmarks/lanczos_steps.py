"""Diagnostic: the first Lanczos steps of ``hessian --top``, printed so that two runs compare step by step.

Prints the start vector's norm and fingerprint (gathered whole), the first product's norm and
fingerprint, and per step j the Gram-Schmidt coefficients of H·v_j against v_0..v_j (α_j last)
and β_j, as ``top_eigenpairs`` computes them (full reorthogonalization, no restart).  Run it in one
process and under torchrun with ``--shard-size``: the same start vector and operator must give the
same numbers to rounding; with ``--hvp exact`` (one process) the coefficients below the diagonal's
neighbour are ~0 (a symmetric operator), which a product far from the Hessian's breaks.

    python benchmarks/lanczos_steps.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct --steps 4
    python -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/lanczos_steps.py \\
        --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct --steps 4 --shard-size 2
"""

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import HessianSettings, ModelSpec  # noqa: E402
from landscape.curvature.lanczos import _basis, _generator, _random_unit  # noqa: E402
from landscape.curvature.linear import _Products  # noqa: E402
from landscape.curvature.operator import HessianOperator  # noqa: E402
from landscape.curvature.stage import _prepare  # noqa: E402
from landscape.runtime import join_torchrun  # noqa: E402


def _whole(H, v) -> torch.Tensor:
    """v gathered whole (a collective on a sharded model), flat float32 on the CPU."""
    return torch.cat([t.reshape(-1) for t in H.to_dict(v).values()])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--hvp", default="difference", choices=["difference", "exact"])
    args = parser.parse_args(argv)
    device, rank, _ = join_torchrun("cpu")
    settings = HessianSettings(model=ModelSpec(args.model, device="cpu", shard_size=args.shard_size),
                               sample=HessianSettings().sample.replace(max_samples=args.samples, seq_len=args.seq_len,
                                                                       batch_size=args.samples), hvp=args.hvp)
    loaded, batches, mask, _, _ = _prepare(settings, None, device)
    H = HessianOperator(loaded.model, batches, mask, loaded.kind, hvp=args.hvp)
    op = _Products(H)

    def say(text):
        if rank == 0:
            print(text, flush=True)

    say(f"{args.model}: {op.dim:,} coordinates ({op.local_dim:,} on this rank), --hvp {args.hvp}, "
        f"shard size {args.shard_size}, {args.samples} x {args.seq_len} tokens")
    with op:
        basis = _basis(args.steps + 1, op, 2**62)  # in memory
        basis.put(0, _random_unit(op.dim, _generator(settings.sample.seed, 1), op.device, dtype=op.dtype, op=op))
        for j in range(args.steps):
            w = op.matvec(basis.get(j))
            for name, vector in ([("start vector", basis.get(0)), ("H v0", w)] if j == 0 else []):
                whole = _whole(H, vector)
                say(f"{name}: norm {float(whole.double().norm()):.10f}, sha1 "
                    f"{hashlib.sha1(whole.numpy().tobytes()).hexdigest()[:12]}")
            w, coeffs = basis.orthogonalize(j + 1, w)
            beta = float(op.norm(w))
            column = coeffs.double().cpu().numpy()
            say(f"step {j}: alpha {column[j]:.10g} beta {beta:.10g} "
                f"coefficients {np.array2string(column, precision=6)}")
            basis.put(j + 1, w.div_(beta))


if __name__ == "__main__":
    main()
