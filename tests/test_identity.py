"""Identity by content (issue 19, items 1 and 7): a resume whose model or sample changed is refused
naming which, and a file made for one model is refused when used with another.

Models are tiny BERTs built here; "another model at the same path" is the same folder with its
weights file replaced by one of other weights.  An interrupted ``fisher`` is stopped in-process
after a checkpoint (the accumulator raises KeyboardInterrupt at its next batch, as Ctrl-C would;
what is on disk is what a SIGKILL after that checkpoint leaves).
"""

import json
import shutil

import h5py
import pytest
import torch
from conftest import cli_in_process as _cli
from conftest import one_line as _one_line
from conftest import write_toy_tsv
from safetensors.torch import load_file

from landscape import identity
from landscape.journal import JsonLines

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def other_bert_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT's architecture and tokenizer with other weights."""
    from transformers import AutoTokenizer, BertForMaskedLM

    path = tmp_path_factory.mktemp("other_bert")
    model = BertForMaskedLM.from_pretrained(tiny_bert_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tiny_bert_dir, tmp_path):
    """A copy of the tiny BERT's folder that a test may replace the weights of."""
    return shutil.copytree(tiny_bert_dir, tmp_path / "model")


def _replace_weights(folder, other):
    shutil.copyfile(other / "model.safetensors", folder / "model.safetensors")


# ----------------------------------------------------------------------------- the fingerprint
def test_the_fingerprint_is_the_checkpoints_whatever_the_dtype_or_the_shards(tiny_bert_dir, other_bert_dir, tmp_path):
    from transformers import BertForMaskedLM

    from landscape.models import load_model

    first = identity.source_fingerprint(tiny_bert_dir)
    assert first == identity.model_fingerprint(load_model(str(tiny_bert_dir), dtype="bfloat16"))
    assert first != identity.source_fingerprint(other_bert_dir)
    # The same weights split into several safetensors shards (with an index): the same fingerprint.
    BertForMaskedLM.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert identity.source_fingerprint(tmp_path / "sharded") == first
    # The configuration counts (other numbers from the same weights), a re-save's bookkeeping does not.
    shutil.copytree(tiny_bert_dir, tmp_path / "config")
    config_path = tmp_path / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, transformers_version="0.0.1", torch_dtype="bfloat16")))
    assert identity.source_fingerprint(tmp_path / "config") == first
    config_path.write_text(json.dumps(dict(config, layer_norm_eps=1e-3)))
    assert identity.source_fingerprint(tmp_path / "config") != first
    # Pickled weights (read with weights_only and mmap) are identified as well.
    for name, folder in (("bin_a", tiny_bert_dir), ("bin_b", other_bert_dir)):
        (tmp_path / name).mkdir()
        torch.save(load_file(str(folder / "model.safetensors")), tmp_path / name / "pytorch_model.bin")
    pickled = [identity.source_fingerprint(tmp_path / name) for name in ("bin_a", "bin_b")]
    assert None not in pickled and pickled[0] != pickled[1]
    # The embedded model is a folder too; a model only in memory is hashed from its parameters.
    assert identity.source_fingerprint(None) == identity.folder_fingerprint(load_model(None).source)
    loaded = load_model(str(tiny_bert_dir))
    assert identity.parameters_fingerprint(loaded.model) == identity.parameters_fingerprint(loaded.model)


# ----------------------------------------------------------------------------- fisher resumes
def _fisher_args(model, corpus, out):
    return ("fisher", "--model", model, "--corpus", corpus, "--out", out, "--max-samples", 8, "--seq-len", 16,
            "--batch-size", 2, "--checkpoint-every", 0, "--quiet", "--device", "cpu")


def _stopped_fisher(capfd, monkeypatch, args, after=2):
    """Run ``fisher`` until ``after`` batches are checkpointed, then interrupt it."""
    from landscape.fisher.accumulator import FisherAccumulator

    real, calls = FisherAccumulator.add_batch, []

    def add_batch(self, *a, **k):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(FisherAccumulator, "add_batch", add_batch)
        code, _, err = _cli(capfd, *args)
    assert code == 130, err


def test_fisher_resume_refuses_an_edited_corpus_or_replaced_model_and_resumes_unchanged_bit_for_bit(
        model_dir, other_bert_dir, tiny_corpus_file, tmp_path, capfd, monkeypatch):
    corpus = shutil.copyfile(tiny_corpus_file, tmp_path / "corpus.jsonl")
    fresh = tmp_path / "fresh.safetensors"
    assert _cli(capfd, *_fisher_args(model_dir, corpus, fresh))[0] == 0
    out = tmp_path / "F.safetensors"
    checkpoint = tmp_path / "F.safetensors.ckpt"
    args = _fisher_args(model_dir, corpus, out)

    _stopped_fisher(capfd, monkeypatch, args)
    assert checkpoint.exists()
    text = corpus.read_text()
    corpus.write_text(text.replace("river", "mountain").replace("market", "harbour"))
    _one_line(*_cli(capfd, *args)[::2], "the sample changed", str(checkpoint))
    corpus.write_text(text)

    backup = tmp_path / "weights.safetensors"
    shutil.copyfile(model_dir / "model.safetensors", backup)
    _replace_weights(model_dir, other_bert_dir)
    _one_line(*_cli(capfd, *args)[::2], "the model changed", str(checkpoint))
    shutil.copyfile(backup, model_dir / "model.safetensors")

    code, _, err = _cli(capfd, *args)  # unchanged: resumes from the checkpoint
    assert code == 0, err
    assert not checkpoint.exists()
    resumed, expected = load_file(str(out)), load_file(str(fresh))
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- surface resume
def test_surface_rerun_after_the_model_was_replaced_is_refused_naming_the_model(
        model_dir, other_bert_dir, tiny_corpus_file, tmp_path, capfd):
    directions, out = tmp_path / "D.h5", tmp_path / "S.h5"
    assert _cli(capfd, "directions", "--model", model_dir, "--dims", 1, "--out", directions)[0] == 0
    args = ("surface", "--model", model_dir, "--directions", directions, "--corpus", tiny_corpus_file,
            "--max-samples", 4, "--seq-len", 16, "--x", "-1:1:3", "--out", out, "--device", "cpu")
    assert _cli(capfd, *args)[0] == 0
    with h5py.File(out, "r") as handle:
        assert handle.attrs[identity.MODEL_KEY] == identity.source_fingerprint(model_dir)
    _replace_weights(model_dir, other_bert_dir)
    _one_line(*_cli(capfd, *args)[::2], "the model changed", str(out))
    # Started afresh, the direction file (made for the old weights) is refused in turn.
    _one_line(*_cli(capfd, *args, "--overwrite")[::2], "direction file", "another model")


# ----------------------------------------------------------------------------- files used with another model
@pytest.fixture(scope="module")
def fisher_of_tiny(tiny_bert_dir, tiny_corpus_file, tmp_path_factory):
    from landscape.cli import main

    out = tmp_path_factory.mktemp("fisher") / "F.safetensors"
    assert main([str(a) for a in _fisher_args(tiny_bert_dir, tiny_corpus_file, out)]) == 0
    return out


def test_a_fisher_file_is_refused_with_another_model_by_every_reader(fisher_of_tiny, tiny_bert_dir, other_bert_dir,
                                                                      tmp_path, capfd):
    from landscape.fisher import fisher_metadata

    assert fisher_metadata(fisher_of_tiny)[identity.MODEL_KEY] == identity.source_fingerprint(tiny_bert_dir)
    other = str(other_bert_dir)
    for args in (("schedule", fisher_of_tiny, "--model", other, "--out", tmp_path / "s.json"),
                 ("profile", fisher_of_tiny, "--model", other, "--out", tmp_path / "profile"),
                 ("directions", "--model", other, "--fisher", fisher_of_tiny, "--subset", "top:10",
                  "--out", tmp_path / "d.h5"),
                 ("directions", "--model", other, "--kind", "hessian", "--fisher", fisher_of_tiny, "--subset",
                  "top:10", "--device", "cpu", "--out", tmp_path / "h.h5"),
                 ("hessian", "--model", other, "--fisher", fisher_of_tiny, "--subset", "top:10", "--device", "cpu",
                  "--out", tmp_path / "h.json")):
        _one_line(*_cli(capfd, *args)[::2], str(fisher_of_tiny), "another model")
    assert not any(tmp_path.iterdir())
    # With its own model the same file is accepted, and the schedule records the model.
    assert _cli(capfd, "schedule", fisher_of_tiny, "--model", tiny_bert_dir, "--out", tmp_path / "s.json")[0] == 0
    recorded = json.loads((tmp_path / "s.json").read_text())[identity.MODEL_KEY]
    assert recorded == identity.source_fingerprint(tiny_bert_dir)


def test_finetune_refuses_a_fisher_or_schedule_of_another_model(fisher_of_tiny, tiny_bert_dir, other_bert_dir,
                                                                 tmp_path, capfd):
    data = write_toy_tsv(tmp_path / "toy.tsv", 24)
    common = ("finetune", "--model", other_bert_dir, "--dataset", data, "--regularizer", "guided", "--restarts", 1,
              "--epochs", 1, "--out", tmp_path / "sum.csv", "--device", "cpu")
    _one_line(*_cli(capfd, *common, "--fisher", fisher_of_tiny)[::2], str(fisher_of_tiny), "another model")
    schedule = tmp_path / "s.json"
    assert _cli(capfd, "schedule", fisher_of_tiny, "--model", tiny_bert_dir, "--out", schedule)[0] == 0
    _one_line(*_cli(capfd, *common, "--schedule", schedule)[::2], "schedule", "another model")
    assert not (tmp_path / "sum.csv").exists()


def test_finetune_sweep_resume_refuses_replaced_weights(model_dir, other_bert_dir, tmp_path, capfd):
    data = write_toy_tsv(tmp_path / "toy.tsv", 16)
    args = ("finetune", "--model", model_dir, "--dataset", data, "--regularizer", "none", "--restarts", 1,
            "--epochs", 1, "--max-train", 8, "--seq-len", 16, "--out", tmp_path / "sum.csv", "--device", "cpu")
    assert _cli(capfd, *args)[0] == 0
    _replace_weights(model_dir, other_bert_dir)
    _one_line(*_cli(capfd, *args)[::2], "the model changed", "sum_runs.csv")


@pytest.mark.slow
def test_compare_refuses_a_hessian_report_of_another_model(tiny_bert_dir, other_bert_dir, tiny_corpus_file,
                                                            tmp_path, capfd):
    sample = ("--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16, "--device", "cpu")
    surfaces, reports = [], []
    for name, model in (("a", tiny_bert_dir), ("b", other_bert_dir)):
        assert _cli(capfd, "directions", "--model", model, "--dims", 1, "--out", tmp_path / f"{name}.d.h5")[0] == 0
        assert _cli(capfd, "surface", "--model", model, "--directions", tmp_path / f"{name}.d.h5", *sample,
                    "--x", "-1:1:5", "--out", tmp_path / f"{name}.h5")[0] == 0
        assert _cli(capfd, "hessian", "--model", model, *sample, "--top", 1, "--quiet",
                    "--out", tmp_path / f"{name}.json")[0] == 0
        surfaces.append(tmp_path / f"{name}.h5")
        reports.append(str(tmp_path / f"{name}.json"))
    code, _, err = _cli(capfd, "compare", *surfaces, "--hessian", ",".join(reports), "--out", tmp_path / "ok.png")
    assert code == 0, err
    swapped = ",".join(reversed(reports))
    _one_line(*_cli(capfd, "compare", *surfaces, "--hessian", swapped, "--out", tmp_path / "bad.png")[::2],
              "Hessian report", "another model")
    assert not (tmp_path / "bad.png").exists()


def test_a_hessian_journal_of_another_model_or_sample_is_refused_naming_it(tmp_path):
    from landscape.curvature.checkpoint import _Journal
    from landscape.errors import UsageError

    path = tmp_path / "H.trace.ckpt"
    start = {"method": "trace", identity.MODEL_KEY: "aaaa", identity.SAMPLE_KEY: "bbbb", "seed": 0}
    _Journal(path, start).add(0, value=1.0)
    with pytest.raises(UsageError, match="the model changed"):
        _Journal(path, dict(start, **{identity.MODEL_KEY: "cccc"}))
    with pytest.raises(UsageError, match="the sample changed"):
        _Journal(path, dict(start, **{identity.SAMPLE_KEY: "dddd"}))
    assert _Journal(path, start).records[0]["value"] == 1.0


def test_files_written_before_fingerprints_are_still_read(fisher_of_tiny, tiny_bert_dir, tmp_path, capfd):
    """A Fisher file without ``model_fingerprint`` (an older one) is checked by names and shapes only."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(fisher_of_tiny), framework="pt") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k != identity.MODEL_KEY}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(fisher_of_tiny)), str(old), metadata=meta)
    assert _cli(capfd, "schedule", old, "--model", tiny_bert_dir, "--out", tmp_path / "s.json")[0] == 0


# ----------------------------------------------------------------------------- one identity (issue 28)
def _change_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def _stopped_hessian(capfd, monkeypatch, args, after):
    """Run ``hessian`` until ``after`` Hessian-vector products are done, then interrupt it."""
    from landscape.curvature.operator import HessianOperator

    real, calls = {name: getattr(HessianOperator, name) for name in ("matvec", "quadratic")}, []

    def counted(name):  # matvec for Lanczos, quadratic for the trace's probes
        def product(self, v):
            calls.append(1)
            if len(calls) > after:
                raise KeyboardInterrupt
            return real[name](self, v)
        return product

    with monkeypatch.context() as patch:
        for name in real:
            patch.setattr(HessianOperator, name, counted(name))
        code, _, err = _cli(capfd, *args)
    assert code == 130, err


def test_a_resume_after_config_json_changed_is_refused_by_every_journal(model_dir, tiny_corpus_file, tmp_path,
                                                                         capfd, monkeypatch):
    # A Hessian trace resumed after "hidden_act": "relu" once mixed probes of two models and claimed
    # the new one: its journals hashed the parameters, which a configuration does not change.
    sample = ("--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16, "--device", "cpu")
    trace = ("hessian", "--model", model_dir, *sample, "--top", 0, "--trace", 6, "--quiet",
             "--out", tmp_path / "T.json")
    top = ("hessian", "--model", model_dir, *sample, "--top", 1, "--trace", 6, "--quiet", "--out", tmp_path / "P.json")
    _stopped_hessian(capfd, monkeypatch, trace, after=3)
    with monkeypatch.context() as patch:  # stopped once the top pair is journaled, before the trace
        from landscape.curvature import report

        patch.setattr(report, "_add_trace", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert _cli(capfd, *top)[0] == 130
    assert (tmp_path / "P.json.top.ckpt").exists() and (tmp_path / "T.json.trace.ckpt").exists()
    fisher = _fisher_args(model_dir, tiny_corpus_file, tmp_path / "F.safetensors")
    _stopped_fisher(capfd, monkeypatch, fisher)
    directions = tmp_path / "D.h5"
    assert _cli(capfd, "directions", "--model", model_dir, "--dims", 1, "--out", directions)[0] == 0
    surface = ("surface", "--model", model_dir, "--directions", directions, *sample, "--x", "-1:1:3",
               "--out", tmp_path / "S.h5")
    assert _cli(capfd, *surface)[0] == 0
    journals = {p: p.read_bytes() for p in tmp_path.glob("*.ckpt")}

    _change_config(model_dir, hidden_act="relu")
    for args, path in ((trace, "T.json.trace.ckpt"), (top, "P.json.top.ckpt"), (fisher, "F.safetensors.ckpt"),
                       (surface, "S.h5")):
        _one_line(*_cli(capfd, *args)[::2], "the model changed", "config.json", path)
    assert {p: p.read_bytes() for p in journals} == journals
    assert not (tmp_path / "T.json").exists() and not (tmp_path / "F.safetensors").exists()


def test_a_fisher_resume_with_other_settings_names_the_setting(model_dir, tiny_corpus_file, tmp_path, capfd,
                                                                monkeypatch):
    # The stage's settings sit in one JSON string of the checkpoint; they are compared field by field.
    args = _fisher_args(model_dir, tiny_corpus_file, tmp_path / "F.safetensors")
    _stopped_fisher(capfd, monkeypatch, args)
    batch = [str(a) for a in args]
    batch[batch.index("--batch-size") + 1] = "4"  # the same tokens, other batches
    _one_line(*_cli(capfd, *batch)[::2], "other settings (batch_size=2, this run has 4)", "delete it")
    seq = [str(a) for a in args]
    seq[seq.index("--seq-len") + 1] = "12"  # other tokens: the sample changed, and the setting that did it
    _one_line(*_cli(capfd, *seq)[::2], "the sample changed", "seq_len was 16, now 12")


def test_the_fingerprint_sees_any_edited_weight_and_is_hashed_once_per_file_version(model_dir, tmp_path,
                                                                                    monkeypatch):
    from safetensors.torch import save_file

    from landscape import weights_hash

    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path / "home"))
    first = identity.source_fingerprint(model_dir)
    assert first.startswith(identity.VERSION_2)
    assert len(list((tmp_path / "home" / "fingerprints").iterdir())) == 1
    # Cached: the file is not read again while its version (size, mtime, ctime, inode) is the same.
    monkeypatch.setattr(weights_hash, "_safetensors_whole", lambda path: pytest.fail("read again"))
    assert identity.source_fingerprint(model_dir) == first
    monkeypatch.undo()
    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path / "home"))
    # One element edited outside the 4096 sampled ones of its tensor: version 1 did not see it.
    weights = load_file(str(model_dir / "model.safetensors"))
    name = max(weights, key=lambda n: weights[n].numel())
    assert weights[name].numel() > weights_hash.SAMPLES_PER_TENSOR
    sampled = {first for first, count in weights_hash._runs(weights[name].numel()) for first in
               range(first, first + count)}
    index = next(i for i in range(1, weights[name].numel()) if i not in sampled)
    before_v1 = identity._source_fingerprint_v1(model_dir)
    weights[name].view(-1)[index] += 1e-3
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    assert identity._source_fingerprint_v1(model_dir) == before_v1  # what version 1 missed
    assert identity.source_fingerprint(model_dir) != first
    # No data home to write: still identified, just not cached.
    monkeypatch.setenv("LANDSCAPE_DATA", "/proc/no-such-home")
    assert identity.source_fingerprint(model_dir) == identity.source_fingerprint(model_dir)


def test_files_and_journals_of_version_1_fingerprints_keep_reading(fisher_of_tiny, tiny_bert_dir, other_bert_dir,
                                                                   model_dir, tiny_corpus_file, tmp_path, capfd,
                                                                   monkeypatch):
    """Files written before version 2 record the sampled fingerprint (the one kept for this): the
    same model reads them, another model is still refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from landscape.models import load_model

    v1 = identity._source_fingerprint_v1(tiny_bert_dir)
    assert identity.is_version_1(v1) and identity.same_model(v1, identity.source_fingerprint(tiny_bert_dir))
    assert identity.same_model(v1, identity.source_fingerprint(other_bert_dir)) is False
    with safe_open(str(fisher_of_tiny), framework="pt") as handle:
        meta = dict(handle.metadata(), **{identity.MODEL_KEY: v1})
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(fisher_of_tiny)), str(old), metadata=meta)
    assert _cli(capfd, "schedule", old, "--model", tiny_bert_dir, "--out", tmp_path / "s.json")[0] == 0
    _one_line(*_cli(capfd, "schedule", old, "--model", other_bert_dir, "--out", tmp_path / "t.json")[::2],
              "another model")
    # A Hessian trace journal of version 1 held the sampled hash of the loaded parameters: it resumes.
    sample = ("--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16, "--device", "cpu")
    trace = ("hessian", "--model", model_dir, *sample, "--top", 0, "--trace", 4, "--quiet", "--out",
             tmp_path / "T.json")
    assert _cli(capfd, *trace[:-1], tmp_path / "whole.json")[0] == 0
    _stopped_hessian(capfd, monkeypatch, trace, after=2)
    journal = tmp_path / "T.json.trace.ckpt"
    lines, form = journal.read_bytes().split(b"\n"), JsonLines("hessian")
    header = form.read_header(lines[0])
    header[identity.MODEL_KEY] = identity.parameters_fingerprint(load_model(str(model_dir)).model)
    journal.write_bytes(b"\n".join([form.header(header).rstrip(b"\n"), *lines[1:]]))
    assert _cli(capfd, *trace)[0] == 0
    traces = [json.loads((tmp_path / name).read_text())["trace"] for name in ("T.json", "whole.json")]
    assert traces[0] == traces[1]
    # A surface of version 1: a rerun reads it as finished, on the same model.
    directions, out = tmp_path / "D.h5", tmp_path / "S.h5"
    assert _cli(capfd, "directions", "--model", model_dir, "--dims", 1, "--out", directions)[0] == 0
    surface = ("surface", "--model", model_dir, "--directions", directions, *sample, "--x", "-1:1:3", "--out", out)
    assert _cli(capfd, *surface)[0] == 0
    with h5py.File(out, "r+") as handle:
        stored = json.loads(handle.attrs["identity"])
        stored[identity.MODEL_KEY] = identity._source_fingerprint_v1(model_dir)
        handle.attrs["identity"] = json.dumps(stored, sort_keys=True)
    code, _, err = _cli(capfd, *surface)
    assert code == 0, err


def test_a_finished_hessian_report_is_compared_as_every_recorded_identity(model_dir, other_bert_dir,
                                                                         tiny_corpus_file, tmp_path, capfd):
    """A rerun reads a finished report back through ``identity.refuse_changed``: one written with a
    version-1 fingerprint reads on the same model; a refusal names the model first, else every
    setting that differs (each once failed: a v1 report was refused, only the first key was named)."""
    from landscape.curvature.report import load_report, save_report

    out = tmp_path / "T.json"

    def hessian(*extra):
        return _cli(capfd, "hessian", "--model", model_dir, "--corpus", tiny_corpus_file, "--max-samples", 4,
                    "--seq-len", 16, "--device", "cpu", "--top", 0, "--quiet", "--out", out, *extra)

    assert hessian("--trace", 2)[0] == 0
    report = load_report(out)
    report["settings"][identity.MODEL_KEY] = identity._source_fingerprint_v1(model_dir)
    save_report(out, report)
    code, text, err = hessian("--trace", 2)
    assert code == 0 and "nothing to do" in text, err
    line = _one_line(*hessian("--trace", 3, "--max-iter", 50)[::2], "holds a Hessian report made with other settings")
    assert "(max_iter=500, this run has max_iter=50; trace=2, this run has trace=3)" in line
    _replace_weights(model_dir, other_bert_dir)
    line = _one_line(*hessian("--trace", 3)[::2], "T.json' holds a Hessian report made with other settings: the "
                     "model changed since it was written")
    assert "trace" not in line


def test_the_fingerprint_cache_drops_records_of_files_that_are_gone(model_dir, tmp_path, monkeypatch):
    # One record per weight file path: temporary folders (a test suite's) would add up for ever.
    from landscape import weights_hash

    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(weights_hash, "KEEP_RECORDS", 2)
    records = tmp_path / "home" / "fingerprints"
    for name in ("a", "b"):
        shutil.copytree(model_dir, tmp_path / name)
        identity.source_fingerprint(tmp_path / name)
    shutil.rmtree(tmp_path / "a")
    identity.source_fingerprint(model_dir)  # a third record: the one of the folder that is gone goes
    kept = {json.loads(p.read_text())["key"]["path"] for p in records.glob("*.json")}
    assert kept == {str((tmp_path / "b" / "model.safetensors").resolve()),
                    str((model_dir / "model.safetensors").resolve())}
