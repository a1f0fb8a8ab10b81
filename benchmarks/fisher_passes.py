"""Benchmark: what more samples per Fisher pass would buy in time and cost in memory, on a real LM.

The accumulator runs a batch in slices of samples whose activations fit its pass budget
(``fisher.budget.samples_per_pass``); on SmolLM2-135M in float32 that is one sample per forward and
backward at 64 and at 128 tokens.  This forces N samples per pass (N = 1 is what the library does
there) and prints, for each N:

  - the peak RSS of ``compute_fisher`` over one batch of the sample, in a fresh process, from the
    moment the model is loaded, in bytes per parameter above the model alone (the same sample, one
    inference forward with labels): the way ``benchmarks/memory.py`` measures its ``fisher`` row;
  - the process CPU seconds of ``compute_fisher`` against a plain batched forward+backward, alternated
    round by round in one process (one thread: CPU seconds are what a shared machine disturbs least);
  - whether the Fisher is the same bits as with one sample per pass.

    OMP_NUM_THREADS=1 python benchmarks/fisher_passes.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct \\
        --samples 4 --seq-len 64 --per-pass 1,2,4 --rounds 2
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _load(args):
    from landscape.data.corpus import load_batches
    from landscape.models import load_model

    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    batches = load_batches(loaded, args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                           batch_size=args.samples, device="cpu")
    return loaded, batches


def _force(per_pass):
    """Every batch runs ``per_pass`` samples per forward and backward (0: the library's own choice)."""
    import landscape.fisher.accumulator as accumulator

    if per_pass:
        accumulator.samples_per_pass = lambda batch, costs, budget: per_pass


def child(args):
    """One measurement in this fresh process: the peak RSS after loading, in bytes (JSON on stdout)."""
    import torch

    from landscape.fisher import compute_fisher

    loaded, batches = _load(args)
    Path("/proc/self/clear_refs").write_text("5")  # the loader's own transient peak is not counted
    if args.child == "model":
        with torch.inference_mode():
            for batch in batches:
                loaded.model(**batch)
    else:
        _force(int(args.child))
        compute_fisher(loaded.model, batches, kind=loaded.kind)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak": peak, "params": sum(p.numel() for p in loaded.model.parameters())}))
    return 0


def peak(args, what):
    """(peak bytes, parameters) of a child measuring ``what`` ('model' or a number of samples per pass)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")  # as benchmarks/memory.py
    argv = [sys.executable, __file__, "--child", str(what), *sys.argv[1:]]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peak"], result["params"]


def timings(args, per_pass):
    """{N: [CPU ratio per round]} and whether every N gave the bits of N = 1."""
    import torch

    import landscape.fisher.accumulator as accumulator
    from landscape.data.objectives import sequence_losses
    from landscape.fisher import compute_fisher

    torch.set_num_threads(1)
    loaded, batches = _load(args)
    model, kind = loaded.model, loaded.kind

    def plain():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            sequence_losses(model, batch, kind).mean_per_sample().sum().backward()
        model.zero_grad(set_to_none=True)

    def cpu(fn):
        start = time.process_time()
        result = fn()
        return time.process_time() - start, result

    library = accumulator.samples_per_pass
    plain()
    ratios, fishers = {n: [] for n in per_pass}, {}
    for _ in range(args.rounds):
        for n in per_pass:
            t_plain, _ = cpu(plain)
            accumulator.samples_per_pass = (lambda batch, costs, budget, n=n: n) if n else library
            t_fisher, fishers[n] = cpu(lambda: compute_fisher(model, batches, kind=kind))
            ratios[n].append(t_fisher / t_plain)
    accumulator.samples_per_pass = library
    first = fishers[per_pass[0]]
    same = {n: all(torch.equal(first[k], f[k]) for k in first) for n, f in fishers.items()}
    return ratios, same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a causal or masked LM folder")
    parser.add_argument("--corpus", default=None, help="the corpus (default: the embedded one)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=4, help="samples, in one batch")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--per-pass", default="1,2,4", help="samples per pass to force (0: the library's choice)")
    parser.add_argument("--rounds", type=int, default=2, help="alternated timing rounds")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args)
    per_pass = [int(n) for n in args.per_pass.split(",")]
    base, params = peak(args, "model")
    print(f"{args.model} ({args.dtype}): {params:,} parameters; one batch of {args.samples} x {args.seq_len} tokens; "
          f"model alone {base / 2**20:.0f} MiB peak RSS after loading")
    ratios, same = timings(args, per_pass)
    print(f"{'per pass':>9}{'peak MiB':>10}{'B/param':>9}  {'CPU ratio (c)/(b) per round':<30}{'same bits':>10}")
    for n in per_pass:
        top, _ = peak(args, n)
        print(f"{n:>9}{top / 2**20:>10.0f}{(top - base) / params:>9.2f}  "
              f"{' '.join(f'{r:.2f}' for r in ratios[n]):<30}{str(same[n]):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
