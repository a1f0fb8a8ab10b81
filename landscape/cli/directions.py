"""directions: the command line of ``landscape.make_directions`` (random, hessian, interpolation, trajectory)."""

import os
from pathlib import Path

from ..adapters import ADAPTER_SUBSET, is_adapter_folder
from ..errors import UsageError
from . import options
from .common import add_new_head_arg, add_overwrite_arg, add_shard_args, add_threads_arg

# Options of --kind hessian's sample; None when left out, so that giving one elsewhere is refused.
_HESSIAN_ONLY = ("corpus", "max_samples", "seq_len", "batch_size", "sample_seed", "bos", "tol", "device")


def register(subparsers):
    parser = subparsers.add_parser(
        "directions", help="filter-normalized, Fisher-masked random directions",
        description="Seeded Gaussian directions, normalized per filter/layer and optionally masked by "
                    "Fisher scores, written to an HDF5 direction file.")
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id, local from_pretrained folder or PEFT adapter folder (default: "
                             "the embedded model)")
    parser.add_argument("--fisher", default=None, help="Fisher file (safetensors) for --subset")
    parser.add_argument("--subset", default=None,
                        help="top:K | bottom:K | random:K | all (K in percent, (0, 100]), or adapter: only the "
                             "parameters of a PEFT adapter --model (its LoRA factors and saved head; no --fisher) "
                             "(default: all)")
    parser.add_argument("--mask-granularity", choices=("global", "tensor"), default="global",
                        help="rank elements over the whole model (global) or inside each tensor (tensor, as the "
                             "paper's code does)")
    parser.add_argument("--norm", choices=("filter", "layer", "none"), default="filter",
                        help="rescale each filter (output unit) or each whole tensor of a direction to the norm of "
                             "the same part of the weights (Li et al.), or leave the Gaussian as drawn")
    parser.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn",
                        help="biasbn: 1-D tensors (biases, LayerNorm) are not perturbed; none: every tensor is")
    parser.add_argument("--seed", type=options.SEED, default=0, help="seed of the directions and of random masks")
    parser.add_argument("--dims", type=int, choices=(1, 2), default=2,
                        help="number of directions: 1 for a 1D curve, 2 for a 2D surface")
    parser.add_argument("--orthogonalize", action="store_true",
                        help="make the second direction orthogonal to the first (default: two independent draws)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="load the weights in this dtype and round the directions to it: a bfloat16 model's "
                             "surface then holds exactly these values, and the file is about half the size")
    parser.add_argument("--out", required=True, help="direction file to write (.h5)")
    add_shard_args(parser)
    add_new_head_arg(parser)
    add_overwrite_arg(parser)
    _add_other_kinds(parser)
    add_threads_arg(parser)
    parser.set_defaults(func=run_directions)


def _add_other_kinds(parser):
    """The options of `directions` for eigenvector axes and paths between checkpoints."""
    group = parser.add_argument_group(
        "kinds beyond random",
        "--kind hessian: the top-1 (--dims 1) or top-2 (--dims 2) Hessian eigenvectors as axes (unit norm), of "
        "P·H·P when --fisher/--subset are given (--ignore as for random directions; --seed seeds the Lanczos "
        "start vector and random masks).  Its sample is set by the corpus options below, whose defaults are "
        "those of `landscape surface`.  --to and --trajectory write raw parameter differences: --norm, --ignore "
        "and --fisher do not apply.")
    group.add_argument("--kind", choices=("random", "hessian"), default="random",
                       help="random: seeded Gaussian directions; hessian: eigenvector axes")
    group.add_argument("--to", default=None, metavar="MODEL_B",
                       help="one direction θ_B − θ_A from --model A to MODEL_B (x = 0 is A, x = 1 is B; "
                            "--dims does not apply; default: random directions)")
    group.add_argument("--trajectory", nargs="+", default=None, metavar="CKPT",
                       help="checkpoints in training order (at least 4): the top-2 PCA plane relative to the "
                            "last one, which is the plane's origin; --model must be that last checkpoint "
                            "(it is when --model is left out; default: random directions)")
    group.add_argument("--corpus", default=None, help="hessian: corpus of the sample (default: the embedded corpus)")
    group.add_argument("--max-samples", type=options.POSITIVE_INT, default=None,
                       help="hessian: sequences (default: 64)")
    group.add_argument("--seq-len", type=options.SEQ_LEN, default=None,
                       help="hessian: tokens per sequence (default: 128)")
    group.add_argument("--batch-size", type=options.POSITIVE_INT, default=None,
                       help="hessian: batch size (default: 16)")
    group.add_argument("--sample-seed", type=options.SEED, default=None,
                       help="hessian: seed of the sample, as `surface --seed` (default: 0)")
    group.add_argument("--bos", choices=("auto", "yes", "no"), default=None,
                       help="hessian: BOS framing of the samples (default: auto)")
    group.add_argument("--tol", type=options.OPEN_UNIT, default=None,
                       help="hessian: eigenpair tolerance (default: 1e-4)")
    group.add_argument("--device", default=None, help="hessian: auto | cpu | cuda | cuda:N (default: auto)")


def _kind_and_options(args):
    """(kind, the options of ``landscape.make_directions``) from the flags, refusing flags that contradict."""
    given = [f"--{name.replace('_', '-')}" for name in _HESSIAN_ONLY if getattr(args, name) is not None]
    path = "to" if args.to else "trajectory" if args.trajectory else None
    if args.to and args.trajectory:
        raise UsageError("--to and --trajectory contradict each other; give one")
    if path and args.kind != "random":
        raise UsageError(f"--kind {args.kind} and --{path} contradict each other; give one")
    if args.kind == "random" and given:
        raise UsageError(f"{given[0]} sets the Hessian's sample: it applies to --kind hessian only")
    common = {"allow_new_head": args.allow_new_head, "overwrite": args.overwrite}
    if path:
        if args.fisher or args.subset:
            raise UsageError(f"--{path} writes raw parameter differences: --fisher/--subset do not apply")
        if path == "to":
            if is_adapter_folder(args.model) and not is_adapter_folder(args.to):
                raise UsageError("--model is a PEFT adapter and --to a plain model: give the plain model (the base) "
                                 "as --model and the adapter as --to; the direction is then in the base's parameters")
            return "interpolation", dict(common, to=args.to)
        return "trajectory", dict(common, checkpoints=args.trajectory)
    subset = args.subset or "all"
    if subset == ADAPTER_SUBSET and args.fisher:
        raise UsageError(f"--subset {ADAPTER_SUBSET} selects the adapter's parameters by name: --fisher does not apply")
    if subset not in ("all", ADAPTER_SUBSET) and not args.fisher:
        raise UsageError(f"--subset {subset} needs --fisher F.safetensors")
    masking = dict(common, dims=args.dims, seed=args.seed, ignore=args.ignore, fisher=args.fisher, subset=subset,
                   granularity=args.mask_granularity, progress=True)
    if args.kind == "hessian":
        sample = {name: getattr(args, name) for name in _HESSIAN_ONLY if getattr(args, name) is not None}
        return "hessian", dict(masking, **sample, log=lambda line: print(line, flush=True))
    return "random", dict(masking, norm=args.norm, orthogonal=args.orthogonalize, dtype=args.dtype,
                          shard_size=args.shard_size)


def run_directions(args):
    from ..direction_kinds import make

    kind, chosen = _kind_and_options(args)
    attrs = make(kind, args.out, args.model, **chosen)
    out = Path(args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary(kind, out, attrs))
    return 0


def _summary(kind, out, attrs) -> str:
    """What was written, in a line (and a trajectory's checkpoints, one per line)."""
    selected = f"{attrs['n_selected']:,} of {attrs['n_parameters']:,} parameters"
    if kind == "interpolation":
        return (f"wrote {out}: 1 direction from {attrs['model']} (x = 0) to {attrs['to']} (x = 1), "
                f"|θ_B − θ_A| = {attrs['distance']:.4g}")
    if kind == "trajectory":
        explained = attrs["explained_variance"]
        lines = [f"wrote {out}: the PCA plane of {len(attrs['trajectory_labels'])} checkpoints around "
                 f"{attrs['model']} (the surface's --model), explained variance {explained[0]:.1%} + "
                 f"{explained[1]:.1%}"]
        lines += [f"  {label}: ({x:.4g}, {y:.4g})"
                  for label, (x, y) in zip(attrs["trajectory_labels"], attrs["trajectory_coordinates"])]
        return "\n".join(lines)
    if kind == "hessian":
        return (f"wrote {out}: the top-{attrs['dims']} Hessian eigenvector(s) over {selected} (subset "
                f"{attrs['subset']}), eigenvalues {', '.join(f'{v:.6g}' for v in attrs['eigenvalues'])}")
    share = 100.0 * attrs["n_selected"] / max(1, attrs["n_parameters"])
    return (f"wrote {out}: {attrs['dims']} direction(s), norm={attrs['norm']}, subset={attrs['subset']}, "
            f"{selected} perturbed ({share:.2f}%), {out.stat().st_size / 2**20:.1f} MiB")
