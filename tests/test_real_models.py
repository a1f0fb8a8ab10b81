"""Real checkpoints through the pipeline (issue 10): SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

`fisher`, `schedule` and the refusal of a headless checkpoint run as a user runs them
(``python -m landscape.cli`` on this checkout); surfaces and the bf16 comparison run in process, on
samples small enough for a 2-core CPU (4 samples x 32 tokens, a 3x3 grid; bf16 on one sample, since
bf16 matmuls are several times slower than float32 on most CPUs).  Each test skips, saying why, when
its checkpoint cannot be built here (``real_checkpoints.real_checkpoint``).

bfloat16 against float32 on the same sample and directions, measured with this file on one
32-token sample: top-1% Fisher overlap 0.94, loss at the origin 0.015 nats apart, at most 2.1%
apart over the 3x3 grid over [-0.5, 0.5]^2 (the corners reach 24 nats).  The bounds below leave
about 3x margin.  Two direct checks catch a float32 -> bf16 regression whatever the bounds: the
one-sample Fisher carries float32 mantissas (a g² formed in bf16 has its low 8 bits zero), and a
perturbed bf16 weight is exactly bf16(float32 sum).  The larger measurement is in docs/fisher.md
and docs/surfaces.md (``benchmarks/bf16_agreement.py``).
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import landscape_cmd, subprocess_env
from real_checkpoints import MINILM, SMOLLM2, real_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # real checkpoints (data/build_checkpoints.py), minutes on 2 cores
SAMPLE = ["--max-samples", 4, "--seq-len", 32, "--batch-size", 4]
NO_FRAMING = "bos=auto: (none) … (none)"  # SmolLM2's tokenizer adds nothing around a text

# bfloat16 vs float32 on the first sample (32 tokens) and a 3x3 grid over [-0.5, 0.5]^2.
MIN_TOP1_OVERLAP = 0.85
MAX_ORIGIN_LOSS_DIFF = 0.05  # nats
MAX_GRID_REL_DIFF = 0.06  # |bf16 - float32| / float32 at every point (the corners reach ~25 nats)


def cli(*args, cwd):
    """``landscape ARGS`` on this checkout (not whichever landscape is installed)."""
    # Threads as the runner set them (one unless it set more: conftest.py), as before the shared helper.
    env = subprocess_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))
    return subprocess.run(landscape_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def smollm2():
    return real_checkpoint(SMOLLM2)


@pytest.fixture(scope="module")
def runs(smollm2, tmp_path_factory):
    """`landscape fisher` and `landscape schedule` on SmolLM2 (float32), as a user runs them."""
    work = tmp_path_factory.mktemp("smollm2")
    ok(cli("fisher", "--model", smollm2, *SAMPLE, "--quiet", "--out", work / "F.safetensors", cwd=work))
    ok(cli("schedule", work / "F.safetensors", "--model", smollm2, "--out", work / "schedule.json", cwd=work))
    return work


def _fisher(path):
    from landscape.fisher import load_fisher

    return load_fisher(path)


def _in_process(folder, dtype):
    """(loaded model, the batches of SAMPLE) in ``dtype``, as `--dtype` loads them."""
    from landscape.data.corpus import load_batches
    from landscape.models import load_model

    loaded = load_model(str(folder), dtype=dtype)
    return loaded, load_batches(loaded, None, max_samples=4, seq_len=32, batch_size=4)


AXIS = np.linspace(-0.5, 0.5, 3)


@pytest.fixture(scope="module")
def float32_run(smollm2):
    """SmolLM2 in float32: the model, its batches, 2D directions and the 3x3 surface."""
    from landscape import directions, surface

    loaded, batches = _in_process(smollm2, "float32")
    dirs, _ = directions.make_directions(loaded.model, dims=2, seed=0)
    z = surface.evaluate(loaded.model, dirs, batches, AXIS, AXIS, kind=loaded.kind)
    return loaded, batches, dirs, z


@pytest.fixture(scope="module")
def bfloat16_run(smollm2):
    """SmolLM2 loaded in bfloat16 (as `--dtype bfloat16` loads it) and the batches of SAMPLE."""
    return _in_process(smollm2, "bfloat16")


def test_smollm2_loss_at_the_origin_is_transformers_own(float32_run):
    from landscape.data.corpus import describe_framing

    loaded, batches, _, z = float32_run
    assert describe_framing(loaded.tokenizer) == NO_FRAMING
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (4, 32)
    with torch.no_grad():
        theirs = float(loaded.model(**batches[0]).loss)
    assert z.shape == (3, 3) and np.isfinite(z).all()
    assert z[1, 1] == pytest.approx(theirs, rel=1e-5)  # (x, y) = (0, 0)
    assert 1.0 < theirs < 6.0  # a pretrained LM on English text, not a random head (ln 49152 = 10.8)
    # Moving away from the pretrained weights raises the loss (the origin is the grid's minimum).
    assert z[1, 1] == z.min()


def test_smollm2_fisher_and_schedule_commands(runs):
    fisher, meta = _fisher(runs / "F.safetensors")
    assert meta["framing"] == NO_FRAMING and meta["objective"] == "causal" and meta["samples"] == "4"
    assert {t.dtype for t in fisher.values()} == {torch.float32}
    assert "model.embed_tokens.weight" in fisher and "lm_head.weight" not in fisher  # tied: stored once
    assert sum(t.numel() for t in fisher.values()) == 134_515_008
    assert all(bool((t >= 0).all()) for t in fisher.values())
    assert float(fisher["model.layers.0.self_attn.q_proj.weight"].sum()) > 0
    sched = json.loads((runs / "schedule.json").read_text())
    sites = sched["sites"]
    assert len(sites) == 30 and all("self_attn" in s["name"] for s in sites)  # one attention site per layer
    ps = sorted(s["p"] for s in sites)
    assert ps[0] == pytest.approx(0.0) and ps[-1] == pytest.approx(0.1)
    assert sched["fisher"].endswith("F.safetensors")


def test_smollm2_masked_surface_commands(runs, float32_run, smollm2):
    """`directions --fisher` and a 3-point `surface` as a user runs them: the origin is transformers'
    own loss, the framing is in the file, and a resume with another framing is refused."""
    from landscape.surface.file import read_surface

    work = runs
    ok(cli("directions", "--model", smollm2, "--fisher", work / "F.safetensors", "--subset", "top:5", "--dims", 1,
           "--out", work / "top5.h5", cwd=work))
    grid = ["--x=-0.1:0.1:3", "--out", work / "top5_s.h5"]
    ok(cli("surface", "--model", smollm2, "--directions", work / "top5.h5", *SAMPLE, *grid, cwd=work))
    s = read_surface(work / "top5_s.h5")
    loaded, batches, _, _ = float32_run
    with torch.no_grad():
        theirs = float(loaded.model(**batches[0]).loss)
    assert s.z.shape == (3,) and np.isfinite(s.z).all()
    assert s.z[1] == pytest.approx(theirs, rel=1e-5)  # x = 0
    assert s.z[0] > s.z[1] and s.z[2] > s.z[1]
    assert s.settings["framing"] == NO_FRAMING
    refused = cli("surface", "--model", smollm2, "--directions", work / "top5.h5", *SAMPLE, "--bos", "yes", *grid,
                  cwd=work)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "framing" in refused.stderr


def test_smollm2_bfloat16_agrees_with_float32_and_accumulates_in_float32(float32_run, bfloat16_run):
    from landscape import surface
    from landscape.fisher import compute_fisher
    from landscape.surface.directions import fisher_mask

    # One sample of 32 tokens: bf16 matmuls are several times slower than float32 on most CPUs.
    f32_loaded, f32_batches, dirs, _ = float32_run
    one = [{k: v[:1] for k, v in f32_batches[0].items()}]
    f32 = compute_fisher(f32_loaded.model, one, kind=f32_loaded.kind)
    z32 = surface.evaluate(f32_loaded.model, dirs, one, AXIS, AXIS, kind=f32_loaded.kind)
    loaded, batches = bfloat16_run
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert torch.equal(batches[0]["input_ids"][:1], one[0]["input_ids"])
    fbf = compute_fisher(loaded.model, one, kind=loaded.kind)
    assert {t.dtype for t in fbf.values()} == {torch.float32}  # the sums are float32 whatever the model
    a, b = fisher_mask(f32, "top:1"), fisher_mask(fbf, "top:1")
    overlap = sum(int((a[n] & b[n]).sum()) for n in a) / sum(int(m.sum()) for m in a.values())
    zbf = surface.evaluate(loaded.model, dirs, one, AXIS, AXIS, kind=loaded.kind)
    diff = np.abs(zbf - z32)
    print(f"bf16 vs float32: top-1% overlap {overlap:.4f}; loss at the origin {z32[1, 1]:.4f} vs {zbf[1, 1]:.4f}; "
          f"grid {z32.min():.2f}..{z32.max():.2f}, max |diff| {diff.max():.4f}, max relative "
          f"{(diff / z32).max():.4f}")
    assert overlap >= MIN_TOP1_OVERLAP
    assert diff[1, 1] <= MAX_ORIGIN_LOSS_DIFF
    assert (diff / z32).max() <= MAX_GRID_REL_DIFF
    # One sample: F = g², g its gradient.  Formed (or squared, or summed) in bf16, g² would have at
    # most 16 significant bits, so the low 8 bits of every float32 mantissa would be 0.
    for name in ("model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        nonzero = fbf[name][fbf[name] > 0]
        low_bits = (nonzero.view(torch.int32) & 0xFF) != 0
        assert float(low_bits.float().mean()) > 0.9, name


@pytest.mark.parametrize("stream", [False, True])
def test_bfloat16_perturbations_are_formed_in_float32(float32_run, bfloat16_run, stream):
    from landscape.surface.perturbation import InPlacePerturbation

    _, _, dirs, _ = float32_run
    model = bfloat16_run[0].model
    # A perturbed bf16 weight is bf16(base + x·dx + y·dy) formed in float32, and restored bit for bit.
    # The directions are held in bf16 on the device, or streamed from the host in float32.
    used = dirs if stream else [{n: t.bfloat16().float() for n, t in d.items()} for d in dirs]
    names = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    perturbation = InPlacePerturbation(model, dirs, stream=stream)
    try:
        for x, y in ((0.3, -0.2), (0.0, 0.7), (0.25, 0.0)):
            perturbation.set((x, y))
            for n in names:
                # float32 sum (the same float32 operations), then one rounding to bf16
                expected = before[n].float()
                expected = torch.add(expected, used[1][n], alpha=y) if y else expected
                expected = torch.add(expected, used[0][n], alpha=x) if x else expected
                assert torch.equal(params[n].detach(), expected.to(torch.bfloat16)), n
                if x and y:  # two terms summed in bf16 would be rounded twice
                    in_bf16 = torch.add(before[n], dirs[0][n].bfloat16(), alpha=x).add_(dirs[1][n].bfloat16(), alpha=y)
                    assert not torch.equal(params[n].detach(), in_bf16)
    finally:
        perturbation.restore()
    for n in names:
        assert torch.equal(params[n].detach(), before[n])


def test_minilm_is_refused_by_fisher_in_one_line(tmp_path):
    folder = real_checkpoint(MINILM)
    refused = cli("fisher", "--model", folder, *SAMPLE, "--out", tmp_path / "F.safetensors", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "--allow-new-head" in refused.stderr and "cls.predictions" in refused.stderr
    assert not (tmp_path / "F.safetensors").exists()


def test_minilm_is_accepted_by_finetuning():
    from landscape.data.labelled import LabelledData
    from landscape.guided.training import FinetuneConfig, finetune_once

    folder = real_checkpoint(MINILM)
    data = LabelledData(texts=["a good film", "a bad film", "a great story", "an awful plot"] * 4,
                        labels=[1, 0, 1, 0] * 4, task="classification", label_names=["0", "1"])
    metrics = finetune_once(str(folder), data, data, "dropout", seed=0,
                            config=FinetuneConfig(epochs=1, batch_size=8, seq_len=16))
    assert 0.0 <= metrics["accuracy"] <= 1.0
