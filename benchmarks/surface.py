"""Benchmark: loss-surface grid evaluation, the paper's way vs a plain forward vs ``surface.evaluate``.

In one run, on the same 2D grid, directions and evaluation sample:
  (a) paper  - the paper code's way: reload the model (``from_pretrained``) at every grid point,
               perturb it, run a full-vocabulary forward with labels;
  (b) plain  - one model perturbed in place per point, a plain Hugging Face forward with labels
               (full-vocabulary logits at every position);
  (c) ours   - ``landscape.surface.evaluate`` (in-place perturbation, vocabulary projection only at
               target positions, inference mode; optional vmapped points per pass).
Checks that the three agree, and prints seconds, points/s, peak memory and the ratios.
Targets on CPU: (a)/(c) >= 2 and (c)/(b) <= 0.85.

    python benchmarks/surface.py                  # embedded model (data/model) or a same-shaped random BERT
    python benchmarks/surface.py --gpu-config     # BERT-base-sized random model (for a GPU): points/s, MFU

With ``--model DIR`` (any causal or masked LM folder, e.g. SmolLM2-135M built by
``data/build_checkpoints.py``) it instead times, alternated point by point in one process, a grid
point as ``surface.evaluate`` computes it (weights set in place, loss over every batch) against a
plain ``model(**batch)`` forward with labels over the same batches, and prints seconds per point and
the ratios (target <= 1.10); ``--whole-grid`` adds one whole ``surface.evaluate`` call:

    python benchmarks/surface.py --model ~/.cache/landscape/checkpoints/smollm2-135m-instruct \\
        --samples 8 --seq-len 128 --batch-size 8 --rounds 10 --threads 1
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import PeakMemory, random_bert_config, random_mlm_batches  # noqa: E402 (this folder is sys.path[0] when run as a script)

from landscape import directions, surface  # noqa: E402
from landscape.datahome import EMBEDDED_MODEL_DIR as DEFAULT_MODEL_DIR  # noqa: E402

# Dense peak TFLOP/s (float32 without tf32, tf32, bf16) used for MFU; --peak-tflops overrides.
PEAKS = {"H100": (67.0, 495.0, 989.0), "H200": (67.0, 495.0, 989.0), "A100": (19.5, 156.0, 312.0)}


def build(args, device, dtype, workdir):
    """(model folder, model, batches, description): a folder is needed to reload per point in (a)."""
    from transformers import BertForMaskedLM

    if not args.gpu_config and (DEFAULT_MODEL_DIR / "config.json").exists():
        from landscape.data.corpus import load_batches
        from landscape.models import load_model

        loaded = load_model(None, device=device, dtype=dtype)
        batches = load_batches(loaded, max_samples=args.samples, seq_len=args.seq_len,
                               batch_size=args.batch_size, device=device)
        return DEFAULT_MODEL_DIR, loaded.model, batches, f"embedded model {DEFAULT_MODEL_DIR}, embedded corpus"
    config, what = random_bert_config(args.gpu_config)
    torch.manual_seed(0)
    folder = Path(workdir) / "model"
    BertForMaskedLM(config).save_pretrained(folder)
    model = BertForMaskedLM.from_pretrained(folder).to(device=device, dtype=dtype).eval()
    batches = random_mlm_batches(config.vocab_size, args.samples, args.seq_len, args.batch_size, device)
    return folder, model, batches, what


def _full_vocab_loss(model, batches):
    """Token-weighted loss and accuracy from a plain forward with labels (full-vocabulary logits)."""
    loss, correct, tokens = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            out = model(**batch)
            is_target = batch["labels"] != -100
            n = float(is_target.sum())
            loss += float(out.loss) * n
            correct += float((out.logits.argmax(-1)[is_target] == batch["labels"][is_target]).sum())
            tokens += n
    return loss / tokens, correct / tokens


def paper_way(folder, dirs, batches, points, device, dtype):
    """(a) Reload the model at every point, perturb it, full-vocabulary forward."""
    from transformers import AutoModelForMaskedLM

    losses = []
    for x, y in points:
        model = AutoModelForMaskedLM.from_pretrained(folder).to(device=device, dtype=dtype).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                step = x * dirs[0][name] + y * dirs[1][name]
                param.add_(step.to(device=device, dtype=param.dtype))
        losses.append(_full_vocab_loss(model, batches)[0])
    return np.array(losses)


def plain_way(model, dirs, batches, points):
    """(b) Perturb one model in place per point, plain forward with labels."""
    perturbation = surface.InPlacePerturbation(model, dirs)
    try:
        losses = []
        for point in points:
            perturbation.set(point)
            losses.append(_full_vocab_loss(model, batches)[0])
    finally:
        perturbation.restore()
    return np.array(losses)


def timed(fn, device, repeats):
    """(result, best seconds over repeats, peak MB of the last repeat)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return result, best, memory.peak_mb


def forward_flops(config, batches):
    """Useful forward FLOPs of one grid point: encoder at every token, vocabulary only at targets."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    flops = 0.0
    for batch in batches:
        b, t = batch["input_ids"].shape
        tokens, targets = b * t, float((batch["labels"] != -100).sum())
        flops += 2 * tokens * layers * (4 * h * h + 2 * h * inter)  # projections and MLP
        flops += 2 * b * layers * 2 * t * t * h  # attention scores and weighted sum
        flops += 2 * tokens * h * h + 2 * targets * h * vocab  # MLM head transform, decoder at targets
    return flops


def _plain_forward(model, batches, kind):
    """One plain transformers forward with labels over the batches: (token-weighted loss, seconds)."""
    start = time.perf_counter()
    loss, tokens = 0.0, 0
    causal = kind == "causal"
    with torch.no_grad():
        for batch in batches:
            # transformers' own loss: the mean over the batch's shifted (causal) or masked targets
            n = int((batch["labels"][:, 1:] if causal else batch["labels"]).ne(-100).sum())
            loss += float(model(**batch).loss) * n
            tokens += n
    return loss / tokens, time.perf_counter() - start


def main_model(args):
    """--model DIR: seconds per surface point against a plain forward with labels, alternated."""
    from landscape.data.corpus import describe_framing, load_batches
    from landscape.models import load_model
    from landscape.surface.evaluation import _points_pass

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    model = loaded.model
    samples, seq_len, batch_size = args.samples or 8, args.seq_len, args.batch_size or 8
    batches = load_batches(loaded, args.corpus, max_samples=samples, seq_len=seq_len, batch_size=batch_size,
                           device=device)
    dirs, _ = directions.make_directions(model, dims=2, seed=0)
    grid = args.grid or 5
    xs = ys = np.linspace(-0.5, 0.5, grid)
    points = surface.grid_points(xs, ys)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({loaded.kind}, {n_params / 1e6:.1f}M parameters, {args.dtype}); "
          f"{samples} samples x {seq_len} tokens ({describe_framing(loaded.tokenizer)}), batch {batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    kind = loaded.kind
    ours0, _ = surface.loss_and_accuracy(model, batches, kind)  # warm-up, and the loss at the origin
    theirs0, _ = _plain_forward(model, batches, kind)
    print(f"loss at the origin: surface {ours0:.6f}, transformers {theirs0:.6f} "
          f"(rel diff {abs(ours0 - theirs0) / abs(theirs0):.1e})")
    # Alternated point by point: one plain forward, then one grid point exactly as surface.evaluate's
    # loop computes it (set the weights in place, loss over every batch), visiting the grid in its
    # row-major order on a perturbation kept across points, as evaluate does (so a point's time
    # includes the row set-up where a row starts, as it does there).
    print(f"{'round':<7}{'point':>14}{'plain s':>9}{'surface s':>11}{'ratio':>8}")
    plain, ours, ratios = [], [], []
    perturbation = surface.InPlacePerturbation(model, dirs)
    try:
        for r in range(args.rounds):
            point = points[r % len(points)]
            _, t_plain = _plain_forward(model, batches, kind)
            start = time.perf_counter()
            _points_pass(model, perturbation, [batches], [point], kind)
            t_ours = time.perf_counter() - start
            perturbation.restore()
            plain.append(t_plain)
            ours.append(t_ours)
            ratios.append(t_ours / t_plain)
            label = "(" + ", ".join(f"{c:g}" for c in point) + ")"
            print(f"{r + 1:<7}{label:>14}{t_plain:>9.3f}{t_ours:>11.3f}{ratios[-1]:>8.3f}")
    finally:
        perturbation.restore()
    print(f"best: plain {min(plain):.3f} s, surface point {min(ours):.3f} s; ratio of bests "
          f"{min(ours) / min(plain):.3f}, median paired ratio {float(np.median(ratios)):.3f}, best paired "
          f"{min(ratios):.3f}  (target <= 1.10)")
    if args.whole_grid:
        start = time.perf_counter()
        surface.evaluate(model, dirs, batches, xs, ys, kind=kind)
        t_grid = (time.perf_counter() - start) / len(points)
        _, t_plain = _plain_forward(model, batches, kind)
        print(f"whole surface.evaluate on the {grid}x{grid} grid: {t_grid:.3f} s/point (set-up included), then a "
              f"plain forward {t_plain:.3f} s: ratio {t_grid / t_plain:.3f}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="a causal or masked LM folder: time surface points against plain forwards with labels")
    parser.add_argument("--corpus", default=None, help="with --model: the corpus (default: the embedded one)")
    parser.add_argument("--rounds", type=int, default=10, help="with --model: alternated rounds (default 10)")
    parser.add_argument("--whole-grid", action="store_true",
                        help="with --model: also time one whole surface.evaluate over the --grid x --grid grid")
    parser.add_argument("--gpu-config", action="store_true", help="BERT-base-sized random model (for a GPU)")
    parser.add_argument("--grid", type=int, default=None, help="points per axis (default: 4 CPU / 8 GPU)")
    parser.add_argument("--samples", type=int, default=None, help="evaluation samples (default: 32 CPU / 256 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 (CPU) / 64 (GPU)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--points-per-pass", type=int, default=1, help="for (c): vmapped points per pass")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | tf32 (CUDA)")
    parser.add_argument("--repeats", type=int, default=2, help="(b) and (c) timings are the best of this many")
    parser.add_argument("--skip-paper", action="store_true", help="skip (a) (slow for big models)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a busy machine 1 can be much faster than the default)")
    args = parser.parse_args(argv)
    if args.model:
        return main_model(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.gpu_config
    args.grid = args.grid or (8 if gpu else 4)
    args.samples = args.samples or (256 if gpu else 32)
    args.batch_size = args.batch_size or (64 if gpu else 16)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if args.dtype in ("bfloat16", "bf16") else torch.float32
    if args.dtype == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True

    with tempfile.TemporaryDirectory() as workdir:
        folder, model, batches, what = build(args, device, dtype, workdir)
        dirs, _ = directions.make_directions(model, dims=2, seed=0)
        xs = ys = np.linspace(-1, 1, args.grid)
        points = surface.grid_points(xs, ys)
        n_params = sum(p.numel() for p in model.parameters())
        n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        n_samples = sum(b["labels"].shape[0] for b in batches)
        print(f"{what}: {n_params / 1e6:.2f}M parameters; {len(points)} grid points; {n_samples} samples x "
              f"{args.seq_len} tokens ({n_tokens} targets), batch {args.batch_size}, device {device}, "
              f"dtype {args.dtype}, torch threads {torch.get_num_threads()}")
        surface.evaluate(model, dirs, batches[:1], xs[:1], ys[:1], kind="mlm")  # warm-up: allocator, kernels
        plain_way(model, dirs, batches[:1], points[:1])

        rows = []
        if not args.skip_paper:
            z_a, t_a, m_a = timed(lambda: paper_way(folder, dirs, batches, points, device, dtype), device, 1)
            rows.append(("(a) reload + full forward (paper)", t_a, m_a))
        z_b, t_b, m_b = timed(lambda: plain_way(model, dirs, batches, points), device, args.repeats)
        rows.append(("(b) in place + plain HF forward", t_b, m_b))
        z_c, t_c, m_c = timed(lambda: surface.evaluate(model, dirs, batches, xs, ys, kind="mlm",
                                                       points_per_pass=args.points_per_pass).reshape(-1),
                              device, args.repeats)
        rows.append(("(c) surface.evaluate", t_c, m_c))

    print(f"{'method':<36}{'seconds':>9}{'points/s':>10}{'peak MB':>10}")
    for name, t, m in rows:
        print(f"{name:<36}{t:>9.3f}{len(points) / t:>10.2f}{m:>10.0f}")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    print(f"max |(b)-(c)| loss = {np.abs(z_b - z_c).max():.2e}" +
          ("" if args.skip_paper else f", max |(a)-(c)| = {np.abs(z_a - z_c).max():.2e}") + f" (tolerance {tol})")
    agree = np.allclose(z_b, z_c, rtol=tol) and (args.skip_paper or np.allclose(z_a, z_c, rtol=tol))
    if not args.skip_paper:
        print(f"ratio (a)/(c) = {t_a / t_c:.2f}  (target >= 2)")
    print(f"ratio (c)/(b) = {t_c / t_b:.2f}  (target <= 0.85)")
    if device.type == "cuda":
        flops = forward_flops(model.config, batches) * len(points)
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((p[2 if dtype == torch.bfloat16 else (1 if args.dtype == "tf32" else 0)]
                                         for key, p in PEAKS.items() if key in name), None)
        achieved = flops / t_c / 1e12
        print(f"(c): {len(points) / t_c:.2f} points/s, {achieved:.1f} TFLOP/s"
              + (f", MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s ({name})" if peak else ""))
    print("peak memory: " + ("CUDA allocator peak" if device.type == "cuda"
                             else "process peak RSS (includes the model, copies and data)"))
    if not agree:
        print("ERROR: the methods disagree")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
