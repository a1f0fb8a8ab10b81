"""Benchmark: the numerics stamp of a load, its cost, and what the tensors kept in float32 move.

docs/identity.md ("Numerics") records in every resumable result the changes of the code's numerics
that apply to the model (``numerics.stamp``).  This loads a checkpoint in ``--dtype``, prints its
stamp and the time the stamp takes, and the mean target-token loss of the load against the same
load with every tensor cast to ``--dtype`` (what ``load_model`` held before it kept a rotary
embedding's frequencies and the class's ``_keep_in_fp32_modules`` in float32).

    python benchmarks/numerics.py --model T5_FOLDER --dtype float16
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import numerics  # noqa: E402
from landscape.data.corpus import load_batches  # noqa: E402
from landscape.data.objectives import sequence_losses  # noqa: E402
from landscape.models import load_model, parse_dtype  # noqa: E402


def _loss(model, batches, kind) -> float:
    with torch.no_grad():
        sums = [sequence_losses(model, batch, kind) for batch in batches]
    return sum(float(s.loss_sum.double().sum()) for s in sums) / sum(float(s.n_tokens.sum()) for s in sums)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a from_pretrained folder (default: the embedded model)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kept = load_model(args.model, dtype=args.dtype)
    cast = load_model(args.model, dtype=args.dtype)
    for tensor in [*cast.model.parameters(), *cast.model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(parse_dtype(args.dtype))
    start = time.perf_counter()
    stamp = numerics.stamp(kept.model)
    seconds = time.perf_counter() - start
    held = sorted({str(t.dtype).replace("torch.", "") for t in kept.model.parameters()})
    batches = load_batches(kept, corpus=args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.batch_size)
    a, b = _loss(kept.model, batches, kept.kind), _loss(cast.model, batches, kept.kind)
    print(f"stamp: {stamp!r} ({seconds * 1e3:.2f} ms); parameters held in {', '.join(held)}")
    print(f"loss as loaded {a:.7f}, every tensor in {args.dtype} {b:.7f}: relative difference "
          f"{abs(a - b) / abs(a):.2e} ({args.samples} samples x {args.seq_len} tokens)")


if __name__ == "__main__":
    main()
