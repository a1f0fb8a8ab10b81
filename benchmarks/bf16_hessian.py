"""Benchmark: a bfloat16 model's Hessian products against a float32 model holding the same weights.

docs/curvature.md ("Memory") promises that a bfloat16 model's products, cast up to float32, are
bit-identical to a float32 model's with the same weights.  This loads a checkpoint in float32 (the
twin), overwrites its weights with a bfloat16 model's (exactly: float32 holds every bfloat16
value), and compares on one sample and one random v: the loss, the gradient and H·v (relative
norm of the difference, largest element's difference, bit-identity).  The bfloat16 models:

  * ``load_model(dtype="bfloat16")``: what ``--dtype bfloat16`` loads;
  * ``Module.to(bfloat16)`` of the float32 load: what ``load_model`` did before it kept the rotary
    frequencies in float32 (torch casts every floating buffer), against the same twin and against a
    twin that also holds its (rounded) buffers.

The last line, for scale: the products of the bfloat16 load against the float32 load's own
(unrounded weights).

    python benchmarks/bf16_hessian.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct
"""

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import curvature  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.data.objectives import sequence_losses  # noqa: E402
from landscape.models import load_model  # noqa: E402


def twin(full: torch.nn.Module, half: torch.nn.Module, buffers: bool) -> torch.nn.Module:
    """A copy of the float32 ``full`` holding ``half``'s weights (and its floating buffers if asked)."""
    out = copy.deepcopy(full)
    with torch.no_grad():
        for name, param in out.named_parameters():
            param.copy_(half.get_parameter(name))
        if buffers:
            for name, buf in out.named_buffers():
                if buf.is_floating_point():
                    buf.copy_(half.get_buffer(name))
    return out


def measure(model, batches, kind, v):
    """(summed loss, flat gradient, H·v) of ``model``, all in float32 as the operator computes them."""
    op = curvature.HessianOperator(model, batches, kind=kind)
    with op, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention fallback's warning
        loss = sum(sequence_losses(model, b, kind).loss_sum.sum() for b in batches)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, op.space.params)])
        return float(loss), grad.detach(), op @ v


def compare(label, got, want) -> None:
    (loss_a, grad_a, hv_a), (loss_b, grad_b, hv_b) = got, want

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    print(f"{label}: loss {loss_a:.9g} vs {loss_b:.9g}; gradient {rel(grad_a, grad_b):.3e}; "
          f"H·v {rel(hv_a, hv_b):.3e} (largest {float((hv_a - hv_b).abs().max()):.3g}); "
          f"bit-identical: {torch.equal(hv_a, hv_b)}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--corpus", default=None, help="text file (default: the embedded corpus)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None, help="default: all samples in one batch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    full = load_model(args.model)
    half = load_model(args.model, dtype="bfloat16")
    cast = copy.deepcopy(full.model).to(torch.bfloat16)
    batches = load_batches(full, corpus=args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.batch_size or args.samples, seed=0)
    kind = full.kind
    rounded = sorted(n for n, b in cast.named_buffers() if b.is_floating_point()
                     and not torch.equal(b.float(), full.model.get_buffer(n)))
    print(f"{args.model or 'embedded model'}: {args.samples} x {args.seq_len} tokens; "
          f"floating buffers Module.to(bfloat16) rounds: {', '.join(rounded) or 'none'}")
    dim = curvature.HessianOperator(full.model, batches, kind=kind).dim
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    loaded = measure(half.model, batches, kind, v)
    compare("load_model(dtype='bfloat16') vs float32 twin", loaded, measure(twin(full.model, half.model, False),
                                                                            batches, kind, v))
    old = measure(cast, batches, kind, v)
    compare("Module.to(bfloat16) (the load before) vs float32 twin", old,
            measure(twin(full.model, cast, False), batches, kind, v))
    compare("Module.to(bfloat16) vs float32 twin with its buffers too", old,
            measure(twin(full.model, cast, True), batches, kind, v))
    compare("for scale: load_model(dtype='bfloat16') vs the float32 load (unrounded weights)", loaded,
            measure(full.model, batches, kind, v))


if __name__ == "__main__":
    main()
