"""Code numerics in the identity of partial results, and a float16 T5 loaded as transformers loads it
(issue 29 follow-ups; docs/identity.md, "Numerics").

A file begun before a change of numerics is simulated as tests/data/legacy's files are: written by
this code, then its stamp taken out (what the previous release wrote lacks it).  Interrupted runs
are stopped in-process (KeyboardInterrupt at the next point or batch, as Ctrl-C would).
"""

import json

import h5py
import pytest
import torch
from conftest import cli_in_process as _cli
from conftest import one_line as _one_line
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from landscape import identity, numerics
from landscape.errors import NumericsChanged, NumericsMismatch, SettingsMismatch, UsageError
from landscape.journal import JsonLines
from landscape.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------- the registry
def test_the_stamp_names_the_changes_that_apply_to_each_load(tiny_llama_dir, tiny_t5_dir, tiny_bert_dir):
    stamps = {(name, dtype): numerics.stamp(load_model(str(folder), dtype=dtype).model)
              for name, folder in (("llama", tiny_llama_dir), ("t5", tiny_t5_dir), ("bert", tiny_bert_dir))
              for dtype in ("float32", "bfloat16", "float16")}
    assert stamps == {("llama", "float32"): "", ("llama", "bfloat16"): "rotary-float32",
                      ("llama", "float16"): "rotary-float32", ("t5", "float32"): "", ("t5", "bfloat16"): "",
                      ("t5", "float16"): "keep-in-fp32-modules", ("bert", "float32"): "", ("bert", "bfloat16"): "",
                      ("bert", "float16"): ""}


def test_a_missing_stamp_is_none_and_any_other_difference_is_named():
    base = {identity.MODEL_KEY: "v2:" + "0" * 16, "seed": 0}
    assert identity.differences(base, dict(base, numerics="")) == []
    assert identity.differences(base, dict(base, numerics="rotary-float32")) == ["numerics"]
    assert identity.differences(dict(base, numerics="b,a"), dict(base, numerics=["a", "b"])) == []
    with pytest.raises(NumericsMismatch, match="numerics none then, rotary-float32 now: since issue 29") as refused:
        identity.refuse_changed("J", base, dict(base, numerics="rotary-float32"))
    assert isinstance(refused.value, SettingsMismatch) and "\n" not in str(refused.value)
    with pytest.raises(NumericsChanged) as refused:  # a caller's plain UsageError: not a SettingsMismatch
        identity.refuse_changed_resume("C", dict(base, numerics="x"), base, "delete it to start over", UsageError)
    assert not isinstance(refused.value, SettingsMismatch) and "'x' is unknown to this code" in str(refused.value)
    assert str(refused.value).endswith("; delete it to start over")


# ----------------------------------------------------------------------------- float16 T5
def test_a_float16_t5_holds_what_transformers_own_float16_load_holds(tiny_t5_dir):
    from transformers import T5ForConditionalGeneration

    for dtype in (torch.float16, torch.bfloat16):
        theirs = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir, dtype=dtype)
        ours = load_model(str(tiny_t5_dir), dtype=str(dtype).replace("torch.", "")).model
        mine = dict([*ours.named_parameters(), *ours.named_buffers()])
        held = dict([*theirs.named_parameters(), *theirs.named_buffers()])
        assert mine.keys() == held.keys()
        assert {n: t.dtype for n, t in mine.items()} == {n: t.dtype for n, t in held.items()}, dtype
        assert all(torch.equal(mine[n], held[n]) for n in held)
    kept = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    assert not kept  # bfloat16 keeps nothing: _keep_in_fp32_modules is for float16 only
    half = load_model(str(tiny_t5_dir), dtype="float16").model
    assert sorted(n for n, p in half.named_parameters() if p.dtype == torch.float32) == sorted(
        n for n, _ in half.named_parameters() if ".wo." in n) != []


def test_a_float16_t5_has_the_hessian_products_of_the_float32_load_holding_its_weights(tiny_t5_dir):
    import warnings

    from landscape import curvature as C
    from landscape.data.corpus import load_batches

    half = load_model(str(tiny_t5_dir), dtype="float16")
    full = load_model(str(tiny_t5_dir))
    with torch.no_grad():
        for name, param in full.model.named_parameters():
            param.copy_(half.model.get_parameter(name))  # wo: float32 in both
    batches = load_batches(full, max_samples=4, seq_len=16, batch_size=2)
    v = torch.randn(C.HessianOperator(full.model, batches, kind=full.kind).dim,
                    generator=torch.Generator().manual_seed(3))
    products = []
    for model in (half.model, full.model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with C.HessianOperator(model, batches, kind=full.kind) as op:
                products.append(op.matvec(v))
    assert torch.isfinite(products[0]).all() and torch.equal(products[0], products[1])
    assert {p.dtype for p in half.model.parameters()} == {torch.float16, torch.float32}  # given back as loaded


def test_a_float16_t5_fisher_is_the_per_sample_loops(tiny_t5_dir, tiny_corpus_file):
    from test_fisher import assert_same_fisher, loop_fisher, small_batches

    from landscape.fisher import compute_fisher

    loaded = load_model(str(tiny_t5_dir), dtype="float16")
    batches = small_batches(loaded, tiny_corpus_file, batch_size=5, max_samples=None)
    fisher = compute_fisher(loaded.model, batches, kind=loaded.kind)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in fisher.values())
    # float16 gradients (float32 for wo), formed batched against one backward per sample.
    assert_same_fisher(fisher, loop_fisher(loaded.model, batches, loaded.kind), rtol=1e-2)


def test_a_float16_t5_surface_perturbs_each_tensor_in_its_own_dtype(tiny_t5_dir, tiny_corpus_file, tmp_path, capfd):
    directions = tmp_path / "D.h5"
    assert _cli(capfd, "directions", "--model", tiny_t5_dir, "--dims", 1, "--out", directions)[0] == 0
    out = tmp_path / "S.h5"
    code, _, err = _cli(capfd, "surface", "--model", tiny_t5_dir, "--dtype", "float16", "--directions", directions,
                        "--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16, "--x", "-1:1:3",
                        "--quiet", "--device", "cpu", "--out", out)
    assert code == 0, err
    with h5py.File(out, "r") as handle:
        loss = handle["train_loss"][()]
        recorded = json.loads(handle.attrs["identity"])
    assert recorded["numerics"] == "keep-in-fp32-modules" and recorded["dtype"] == "float16"
    # The origin is the model as loaded: its loss is the float16 forward's, float32 wo and all.
    from landscape.data.corpus import load_batches
    from landscape.data.objectives import sequence_losses

    loaded = load_model(str(tiny_t5_dir), dtype="float16")
    batches = load_batches(loaded, corpus=str(tiny_corpus_file), max_samples=4, seq_len=16)
    with torch.no_grad():
        losses = [sequence_losses(loaded.model, b, loaded.kind) for b in batches]
    nll = sum(float(s.loss_sum.double().sum()) for s in losses) / sum(float(s.n_tokens.sum()) for s in losses)
    assert loss[1] == pytest.approx(nll, rel=1e-3) and all(map(float.__ne__, loss[[0, 2]], loss[[1, 1]]))


def test_a_float16_t5_is_refused_for_sharding_in_one_line(tiny_t5_dir):
    from types import SimpleNamespace

    from landscape.errors import UsageError
    from landscape.sharding import shard_model

    half = load_model(str(tiny_t5_dir), dtype="float16").model
    # FSDP2 gathers one dtype per unit: it would fail at the first forward, in an AssertionError.
    with pytest.raises(UsageError, match=r"several dtypes \(float16, float32") as refused:
        shard_model(half, SimpleNamespace(sharded=True))
    assert "\n" not in str(refused.value)


# ----------------------------------------------------------------------------- resumes
def _stopped_surface(capfd, monkeypatch, args, after=1):
    """Run ``surface`` until ``after`` batches of points are journaled, then interrupt it."""
    from landscape.surface.file import SurfaceFile

    real, calls = SurfaceFile.record, []

    def record(self, results):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(self, results)

    with monkeypatch.context() as patch:
        patch.setattr(SurfaceFile, "record", record)
        code, _, err = _cli(capfd, *args)
    assert code == 130, err


def _as_before(surface):
    """Take the stamp out of a surface and its journal: what the release before the stamp wrote."""
    with h5py.File(surface, "r+") as handle:
        recorded = json.loads(handle.attrs["identity"])
        recorded.pop("numerics", None)
        handle.attrs["identity"] = json.dumps(recorded, sort_keys=True)
        if "numerics" in handle.attrs:
            del handle.attrs["numerics"]
    journal = surface.parent / (surface.name + ".journal")
    header, rest = journal.read_bytes().split(b"\n", 1)
    lines = JsonLines("surface")
    stored = lines.read_header(header)
    stored.pop("numerics", None)
    journal.write_bytes(lines.header(stored) + rest)


@pytest.fixture
def llama_surface(tiny_llama_dir, tiny_corpus_file, tmp_path, capfd):
    directions = tmp_path / "D.h5"
    assert _cli(capfd, "directions", "--model", tiny_llama_dir, "--dims", 1, "--out", directions)[0] == 0
    return lambda dtype, out: ("surface", "--model", tiny_llama_dir, "--dtype", dtype, "--directions", directions,
                               "--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16, "--batch-size", 4,
                               "--x", "-1:1:5", "--points-per-pass", 1, "--quiet", "--device", "cpu", "--out", out)


def test_a_bfloat16_llama_surface_begun_under_other_numerics_is_refused_and_others_resume(
        llama_surface, tmp_path, capfd, monkeypatch):
    fresh = tmp_path / "fresh.h5"
    assert _cli(capfd, *llama_surface("bfloat16", fresh))[0] == 0
    # Begun by this code: it resumes to the uninterrupted surface, bit for bit.
    resumed = tmp_path / "resumed.h5"
    _stopped_surface(capfd, monkeypatch, llama_surface("bfloat16", resumed), after=2)
    code, _, err = _cli(capfd, *llama_surface("bfloat16", resumed))
    assert code == 0, err
    with h5py.File(resumed, "r") as a, h5py.File(fresh, "r") as b:
        assert (a["train_loss"][()] == b["train_loss"][()]).all()
    # Begun before the stamp (the rotary frequencies were rounded then): refused, nothing written.
    before = tmp_path / "before.h5"
    _stopped_surface(capfd, monkeypatch, llama_surface("bfloat16", before), after=2)
    _as_before(before)
    files = {p: p.read_bytes() for p in (before, tmp_path / "before.h5.journal")}
    _one_line(*_cli(capfd, *llama_surface("bfloat16", before))[::2], str(before), "other numerics",
              "numerics none then, rotary-float32 now", "--overwrite")
    assert {p: p.read_bytes() for p in files} == files
    # float32: no change applies, no stamp is recorded, and a file of then resumes.
    full = tmp_path / "full.h5"
    _stopped_surface(capfd, monkeypatch, llama_surface("float32", full), after=2)
    with h5py.File(full, "r") as handle:
        assert "numerics" not in json.loads(handle.attrs["identity"]) and "numerics" not in handle.attrs
    code, _, err = _cli(capfd, *llama_surface("float32", full))
    assert code == 0, err


def test_a_bfloat16_llama_fisher_checkpoint_begun_under_other_numerics_is_refused(
        tiny_llama_dir, tiny_corpus_file, tmp_path, capfd, monkeypatch):
    from test_identity import _stopped_fisher

    out = tmp_path / "F.safetensors"
    args = ("fisher", "--model", tiny_llama_dir, "--dtype", "bfloat16", "--corpus", tiny_corpus_file, "--out", out,
            "--max-samples", 8, "--seq-len", 16, "--batch-size", 2, "--checkpoint-every", 0, "--quiet",
            "--device", "cpu")
    _stopped_fisher(capfd, monkeypatch, args)
    checkpoint = tmp_path / "F.safetensors.ckpt"
    with safe_open(str(checkpoint), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta.pop("numerics", None)
    kept = tmp_path / "kept.ckpt"
    kept.write_bytes(checkpoint.read_bytes())
    save_file(load_file(str(checkpoint)), str(checkpoint), metadata=meta)  # as the release before wrote it
    before = checkpoint.read_bytes()
    _one_line(*_cli(capfd, *args)[::2], str(checkpoint), "other numerics", "numerics none then, rotary-float32 now",
              "delete it to start over")
    assert checkpoint.read_bytes() == before and not out.exists()
    checkpoint.write_bytes(kept.read_bytes())  # the one this code began: resumes
    code, _, err = _cli(capfd, *args)
    assert code == 0, err
    assert out.exists() and not checkpoint.exists()


def test_a_bfloat16_llama_trace_journal_begun_under_other_numerics_is_refused(tiny_llama, tiny_llama_dir, tmp_path):
    import warnings

    from landscape import curvature as C
    from landscape.data.corpus import load_batches

    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16")
    batches = load_batches(loaded, max_samples=2, seq_len=16, batch_size=2)
    op = C.HessianOperator(loaded.model, batches, kind=loaded.kind)
    journal = tmp_path / "trace.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = C.trace(op, samples=3, seed=0)
        C.trace(op, samples=2, seed=0, checkpoint=journal)
        lines = JsonLines("hessian")
        C.trace(op, samples=2, seed=0, checkpoint=journal.with_name("old.ckpt"))
        old = journal.with_name("old.ckpt")
        header, rest = old.read_bytes().split(b"\n", 1)
        stored = lines.read_header(header)
        stored.pop("numerics", None)
        old.write_bytes(lines.header(stored) + rest)
        with pytest.raises(NumericsChanged, match="numerics none then, rotary-float32 now"):
            C.trace(op, samples=3, seed=0, checkpoint=old)
        header = journal.read_bytes().split(b"\n", 1)[0]
        assert lines.read_header(header).get("numerics") == "rotary-float32"  # begun by this code: resumes
        assert C.trace(op, samples=3, seed=0, checkpoint=journal) == pytest.approx(whole, rel=1e-12)
    # A float32 Llama records no stamp.
    full = C.HessianOperator(tiny_llama.model, load_batches(tiny_llama, max_samples=2, seq_len=16, batch_size=2),
                             kind=tiny_llama.kind)
    assert "numerics" not in full.identity()


def test_a_bfloat16_llama_critical_sweep_row_measured_under_other_numerics_is_refused(
        tiny_llama_dir, tiny_corpus_file, tmp_path):
    import shutil

    from landscape import critical_sweep
    from landscape.settings import CriticalSharpnessSettings, ModelSpec, SampleSpec

    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_llama_dir, run / f"checkpoint-{step}")
    checkpoints = critical_sweep.checkpoints_of([run])

    def settings(dtype):
        return CriticalSharpnessSettings(model=ModelSpec(dtype=dtype), sample=SampleSpec(
            corpus=str(tiny_corpus_file), max_samples=4, seq_len=16, batch_size=4))

    out = tmp_path / "S.csv"
    first = critical_sweep.run_critical_sweep(settings("bfloat16"), checkpoints, out=out)
    journal = critical_sweep.journal_path(out)
    records = [json.loads(line.rsplit(b" ", 1)[0]) for line in journal.read_bytes().splitlines()[1:]]
    # Stamped from the configuration, as the load stamps the model it measured.
    loaded = numerics.stamp(load_model(checkpoints[0], dtype="bfloat16").model)
    assert [r.get("numerics") for r in records] == [loaded, loaded] == ["rotary-float32"] * 2
    again = critical_sweep.run_critical_sweep(settings("bfloat16"), checkpoints, out=out)  # this code's rows
    assert again.computed == 0 and again.rows == first.rows
    # A row journaled before the stamp: refused, nothing measured or written.
    header = journal.read_bytes().split(b"\n", 1)[0]
    old = dict(records[1])
    old.pop("numerics")
    journal.write_bytes(header + b"\n" + JsonLines(critical_sweep.KIND).record(records[0])
                        + JsonLines(critical_sweep.KIND).record(old))
    before = journal.read_bytes()
    with pytest.raises(NumericsMismatch, match="checkpoint-2.*numerics none then, rotary-float32 now"):
        critical_sweep.run_critical_sweep(settings("bfloat16"), checkpoints, out=out)
    assert journal.read_bytes() == before
    # float32: no stamp.
    full = tmp_path / "F.csv"
    critical_sweep.run_critical_sweep(settings("float32"), checkpoints, out=full)
    assert b"numerics" not in critical_sweep.journal_path(full).read_bytes()
