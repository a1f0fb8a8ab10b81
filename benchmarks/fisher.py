"""Benchmark: exact batched Fisher vs the paper's batch-size-1 loop vs a plain forward+backward.

In one run, on the same samples:
  (a) loop   - the paper's code: one forward + backward per sample, square ``.grad``, accumulate;
  (b) floor  - one plain batched forward + backward per batch (what any training step costs);
  (c) fisher - ``landscape.fisher.compute_fisher`` (exact per-sample gradients, batched).
Prints seconds, samples/s, peak memory and the ratios (c)/(b) and (c)/(a).
Targets on CPU: (c) <= 1.5x (b) and (c) no slower than (a).

    python benchmarks/fisher.py                 # embedded model (data/model) or a same-shaped random BERT
    python benchmarks/fisher.py --gpu-config    # BERT-base-sized random model, seq 128 (for a GPU)

With ``--model DIR`` (any causal or masked LM folder, e.g. SmolLM2-135M built by
``data/build_checkpoints.py``) it times (b) and (c) alternated in one process, round after round,
on the embedded corpus (or ``--corpus``), and prints each round's ratio and peak memory; (a) runs
only with ``--loop-samples N``:

    python benchmarks/fisher.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct \
        --samples 8 --seq-len 128 --batch-size 8 --rounds 3
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import PeakMemory, random_bert_config, random_mlm_batches  # noqa: E402 (this folder is sys.path[0] when run as a script)

from landscape.data.objectives import sequence_losses  # noqa: E402
from landscape.datahome import EMBEDDED_MODEL_DIR as DEFAULT_MODEL_DIR  # noqa: E402
from landscape.fisher import compute_fisher  # noqa: E402


def build(args, device):
    """(model, batches, description, objective) for the chosen configuration."""
    from transformers import BertForMaskedLM

    if args.model:
        from landscape.data.corpus import describe_framing, load_batches
        from landscape.models import load_model

        loaded = load_model(args.model, device=device, dtype=args.dtype)
        batches = load_batches(loaded, args.corpus, max_samples=args.samples, seq_len=args.seq_len,
                               batch_size=args.batch_size, device=device)
        return loaded.model, batches, (f"{args.model} ({loaded.kind}, {args.dtype}, "
                                       f"{describe_framing(loaded.tokenizer)})"), loaded.kind
    if not args.gpu_config and (DEFAULT_MODEL_DIR / "config.json").exists():
        from landscape.data.corpus import load_batches
        from landscape.models import load_model

        loaded = load_model(None, device=device)
        batches = load_batches(loaded, max_samples=args.samples, seq_len=args.seq_len,
                               batch_size=args.batch_size, device=device)
        return loaded.model, batches, f"embedded model {DEFAULT_MODEL_DIR} on the embedded corpus", loaded.kind
    config, what = random_bert_config(args.gpu_config)
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device).eval()
    batches = random_mlm_batches(config.vocab_size, args.samples, args.seq_len, args.batch_size, device)
    return model, batches, what, "mlm"


def loop_fisher(model, batches, kind):
    """(a) The paper's method: batch-size-1 forward/backward, square the gradient, accumulate."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for row in range(batch["labels"].shape[0]):
            sample = {k: v[row: row + 1] for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            sequence_losses(model, sample, kind).mean_per_sample().sum().backward()
            for total, p in zip(sums, params):
                if p.grad is not None:
                    total.add_(p.grad.square())
    model.zero_grad(set_to_none=True)
    return sums


def plain_backward(model, batches, kind):
    """(b) The floor: one ordinary batched forward + backward per batch."""
    for batch in batches:
        model.zero_grad(set_to_none=True)
        sequence_losses(model, batch, kind).mean_per_sample().sum().backward()
    model.zero_grad(set_to_none=True)


def timed(fn, device, repeats, cpu=None):
    """(best seconds over repeats, peak MB of the last repeat).

    ``cpu``: a list that gets this process's CPU seconds of the best repeat (on a shared machine,
    with one thread, far less disturbed by the other jobs than the wall clock).
    """
    best, best_cpu = float("inf"), None
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if seconds < best:
                best, best_cpu = seconds, time.process_time() - start_cpu
    if cpu is not None:
        cpu.append(best_cpu)
    return best, memory.peak_mb


def alternated(args, model, batches, kind, device, n_samples):
    """--model: (b) and (c) alternated, one of each per round; each round's ratio, the best ones."""
    if args.loop_samples:
        loop_batches = [{k: v[: args.loop_samples] for k, v in batches[0].items()}]
        t_loop, m_loop = timed(lambda: loop_fisher(model, loop_batches, kind), device, 1)
        print(f"(a) batch-size-1 loop (paper): {t_loop * n_samples / args.loop_samples:.2f} s for {n_samples} "
              f"samples (timed on {args.loop_samples}), peak {m_loop:.0f} MB")
    print(f"{'round':<7}{'(b) fwd+bwd s':>14}{'peak MB':>9}{'(c) fisher s':>14}{'peak MB':>9}{'ratio':>8}"
          f"{'(b) cpu s':>11}{'(c) cpu s':>11}{'cpu ratio':>10}")
    floor, fisher, ratios, peaks, cpu_floor, cpu_fisher = [], [], [], [], [], []
    for r in range(args.rounds):
        t_floor, m_floor = timed(lambda: plain_backward(model, batches, kind), device, 1, cpu_floor)
        t_fisher, m_fisher = timed(lambda: compute_fisher(model, batches, kind=kind), device, 1, cpu_fisher)
        floor.append(t_floor)
        fisher.append(t_fisher)
        ratios.append(t_fisher / t_floor)
        peaks.append((m_floor, m_fisher))
        print(f"{r + 1:<7}{t_floor:>14.2f}{m_floor:>9.0f}{t_fisher:>14.2f}{m_fisher:>9.0f}{ratios[-1]:>8.2f}"
              f"{cpu_floor[-1]:>11.2f}{cpu_fisher[-1]:>11.2f}{cpu_fisher[-1] / cpu_floor[-1]:>10.2f}")
    cpu_ratios = sorted(c / f for c, f in zip(cpu_fisher, cpu_floor))
    print(f"best: (b) {min(floor):.2f} s, (c) {min(fisher):.2f} s for {n_samples} samples; ratio of bests "
          f"{min(fisher) / min(floor):.2f}, best paired ratio {min(ratios):.2f}, median paired ratio "
          f"{sorted(ratios)[len(ratios) // 2]:.2f}  (target <= 1.5)")
    print(f"cpu: (b) {min(cpu_floor):.2f} s, (c) {min(cpu_fisher):.2f} s; median paired cpu ratio "
          f"{cpu_ratios[len(cpu_ratios) // 2]:.2f}, best {cpu_ratios[0]:.2f}  (process CPU seconds, one thread: "
          "what a loaded machine disturbs least)")
    print(f"peak memory (max over rounds): (b) {max(p[0] for p in peaks):.0f} MB, "
          f"(c) {max(p[1] for p in peaks):.0f} MB  "
          + ("(CUDA allocator peak)" if device.type == "cuda"
             else "(process peak RSS: includes the Python runtime, the model and the data)"))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-config", action="store_true",
                        help="BERT-base-sized random model at seq 128 (meant for a GPU)")
    parser.add_argument("--samples", type=int, default=None, help="default: 64 (CPU) / 256 (--gpu-config)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 (CPU) / 32 (--gpu-config)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    parser.add_argument("--loop-samples", type=int, default=None,
                        help="samples for the slow batch-size-1 loop (default: all); its time is scaled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None,
                        help="a causal or masked LM folder: (b) and (c) alternated over --rounds")
    parser.add_argument("--corpus", default=None, help="with --model: the corpus (default: the embedded one)")
    parser.add_argument("--dtype", default="float32", help="with --model: float32 | bfloat16")
    parser.add_argument("--rounds", type=int, default=3, help="with --model: alternated rounds (default 3)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (8 if args.model else 256 if args.gpu_config else 64)
    args.batch_size = args.batch_size or (8 if args.model else 32 if args.gpu_config else 16)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))

    model, batches, what, kind = build(args, device)
    n_samples = sum(b["labels"].shape[0] for b in batches)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{what}: {n_params / 1e6:.2f}M parameters; {n_samples} samples x {args.seq_len} tokens, "
          f"batch {args.batch_size}, device {device}, torch threads {torch.get_num_threads()}")
    plain_backward(model, batches[:1], kind)  # warm-up: allocator, kernels, lazy init
    compute_fisher(model, batches[:1], kind=kind)
    if args.model:
        return alternated(args, model, batches, kind, device, n_samples)

    loop_batches = batches
    if args.loop_samples:
        loop_batches = [{k: v[: args.loop_samples] for k, v in batches[0].items()}]
    loop_n = sum(b["labels"].shape[0] for b in loop_batches)
    t_loop, m_loop = timed(lambda: loop_fisher(model, loop_batches, kind), device, 1)
    t_loop *= n_samples / loop_n
    t_floor, m_floor = timed(lambda: plain_backward(model, batches, kind), device, args.repeats)
    t_fisher, m_fisher = timed(lambda: compute_fisher(model, batches, kind=kind), device, args.repeats)

    print(f"{'method':<34}{'seconds':>9}{'samples/s':>11}{'peak MB':>10}")
    for name, t, m in (("(a) batch-size-1 loop (paper)", t_loop, m_loop),
                       ("(b) plain batched fwd+bwd (floor)", t_floor, m_floor),
                       ("(c) compute_fisher (exact)", t_fisher, m_fisher)):
        print(f"{name:<34}{t:>9.3f}{n_samples / t:>11.1f}{m:>10.0f}")
    print(f"ratio (c)/(b) = {t_fisher / t_floor:.2f}  (target <= 1.5)")
    print(f"ratio (c)/(a) = {t_fisher / t_loop:.2f}  (target <= 1.0; speed-up over the loop "
          f"{t_loop / t_fisher:.1f}x)")
    if args.loop_samples:
        print(f"(a) was timed on {loop_n} samples and scaled to {n_samples}")
    print("peak memory: " + ("CUDA allocator peak" if device.type == "cuda"
                             else "process peak RSS (includes the model and data)"))


if __name__ == "__main__":
    sys.exit(main())
