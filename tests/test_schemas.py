"""Every file a stage reads goes through its kind's schema (issue 19, item 6): a damaged or foreign
file is one line naming the file and what is wrong, exit 2, never a traceback and never a number.

One test per case of the fault campaign that ended in a traceback (or ran) before: unreadable or
non-finite model weights, a model folder without a tokenizer, an integer Fisher, a Hessian report
with missing or mistyped fields, a trace journal of binary garbage, a sweep journal cell edited to
``nan``, NaN or infinite labels.  Commands run in this process (``landscape.cli.main``).
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, cli_in_process
from conftest import one_line as _one_line
from safetensors.torch import load_file, save_file

from landscape.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 4)


def _cli(capfd, *args):
    """(exit code, stderr) of the command line run in this process."""
    code, _, err = cli_in_process(capfd, *args)
    return code, err


def _model_copy(source, folder, edit=None):
    """A copy of the model folder ``source``; ``edit(path of model.safetensors)`` changes it."""
    shutil.copytree(source, folder)
    if edit is not None:
        edit(folder / "model.safetensors")
    return folder


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(bytes(range(256)) * 20)


def _nan_weight(path):
    tensors = load_file(str(path))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def labelled(tmp_path):
    def write(name, bad_label=None):
        rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
        if bad_label is not None:
            rows[2] = (rows[2][0], bad_label)
        path = tmp_path / name
        path.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
        return path
    return write


def _finetune(dataset, out, *extra, model=None):
    return ("finetune", *(("--model", model) if model else ()), "--dataset", dataset, "--regularizer", "none",
            "--epochs", 1, "--seq-len", 16, "--batch-size", 4, "--threads", 1, "--out", out, *extra)


# ============================================================================= model weights
@pytest.mark.parametrize("damage, words", [(_truncate, "not fully covered"), (_garbage, "header")])
def test_unreadable_safetensors_weights_are_one_line_in_every_command(damage, words, tiny_bert_dir, tiny_corpus_file,
                                                                      labelled, tmp_path, capfd):
    model = _model_copy(tiny_bert_dir, tmp_path / "model", damage)
    commands = [("fisher", "--model", model, "--corpus", tiny_corpus_file, *SAMPLE,
                 "--out", tmp_path / "F.safetensors"),
                ("directions", "--model", model, "--out", tmp_path / "d.h5"),
                ("hessian", "--model", model, "--corpus", tiny_corpus_file, *SAMPLE, "--top", 1,
                 "--out", tmp_path / "h.json"),
                _finetune(labelled("l.csv"), tmp_path / "ft.csv", model=model)]
    for command in commands:
        code, err = _cli(capfd, *command)
        _one_line(code, err, "model.safetensors", "cannot be read", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "model"]


def test_a_model_with_a_nan_weight_gets_no_fisher(tiny_bert_dir, tiny_corpus_file, labelled, tmp_path, capfd):
    model = _model_copy(tiny_bert_dir, tmp_path / "model", _nan_weight)
    code, err = _cli(capfd, "fisher", "--model", model, "--corpus", tiny_corpus_file, *SAMPLE,
                     "--out", tmp_path / "F.safetensors")
    _one_line(code, err, "non-finite weights", "token_type_embeddings")
    code, err = _cli(capfd, *_finetune(labelled("l.csv"), tmp_path / "ft.csv", model=model))
    _one_line(code, err, "non-finite weights")
    assert not (tmp_path / "F.safetensors").exists() and not (tmp_path / "ft.csv").exists()


def test_a_model_folder_without_a_tokenizer_is_one_line(tiny_bert_dir, tiny_corpus_file, tmp_path, capfd):
    model = _model_copy(tiny_bert_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    code, err = _cli(capfd, "fisher", "--model", model, "--corpus", tiny_corpus_file, *SAMPLE,
                     "--out", tmp_path / "F.safetensors")
    _one_line(code, err, "has no tokenizer", "tokenizer.json")
    assert not (tmp_path / "F.safetensors").exists()


# ============================================================================= Fisher files
def test_an_integer_or_foreign_fisher_is_refused_by_directions(tiny_bert, tiny_bert_dir, tmp_path, capfd):
    from landscape.fisher import save_fisher

    params = dict(tiny_bert.model.named_parameters())
    integer = tmp_path / "int.safetensors"
    save_file({n: torch.ones(p.shape, dtype=torch.int64) for n, p in params.items()}, str(integer),
              metadata={"format": "landscape-fisher-v1"})
    code, err = _cli(capfd, "directions", "--model", tiny_bert_dir, "--fisher", integer, "--subset", "top:5",
                     "--out", tmp_path / "d.h5")
    _one_line(code, err, "int.safetensors", "int64, not float32")
    # Model weights have the Fisher's names and shapes, but no Fisher header.
    weights = Path(tiny_bert_dir) / "model.safetensors"
    code, err = _cli(capfd, "directions", "--model", tiny_bert_dir, "--fisher", weights, "--subset", "top:5",
                     "--out", tmp_path / "d.h5")
    _one_line(code, err, "is not a Fisher file", "format 'pt'")
    good = save_fisher(tmp_path / "F.safetensors", {n: torch.rand_like(p) for n, p in params.items()})
    assert _cli(capfd, "directions", "--model", tiny_bert_dir, "--fisher", good, "--subset", "top:5",
                "--out", tmp_path / "d.h5")[0] == 0


def test_a_fisher_file_from_before_the_format_key_still_reads(tiny_bert, tmp_path):
    from landscape.fisher import load_fisher
    from landscape.fisher.file import DEFINITION

    params = dict(tiny_bert.model.named_parameters())
    old = tmp_path / "old.safetensors"
    save_file({n: torch.rand_like(p) for n, p in params.items()}, str(old),
              metadata={"definition": DEFINITION, "model": "m", "samples": "8"})
    scores, meta = load_fisher(old)
    assert set(scores) == set(params) and "format" not in meta


def test_a_damaged_fisher_checkpoint_is_refused_on_resume(tiny_bert, tiny_corpus_file, tmp_path):
    from safetensors import safe_open

    from landscape.data.corpus import load_batches
    from landscape.fisher import compute_fisher

    batches = load_batches(tiny_bert, tiny_corpus_file, max_samples=4, seq_len=16, batch_size=2)
    path = tmp_path / "F.ckpt"
    clean = compute_fisher(tiny_bert.model, batches, checkpoint=path, checkpoint_every=0.0, fingerprint="x",
                           kind=tiny_bert.kind)
    resumed = compute_fisher(tiny_bert.model, batches, checkpoint=path, fingerprint="x",
                             kind=tiny_bert.kind)  # every batch done
    assert all(torch.equal(clean[n], resumed[n]) for n in clean)
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    name = sorted(k for k in state if k.startswith("sum/"))[0]
    for edit, words in ((lambda s, m: s[name].view(-1).__setitem__(0, float("nan")), "non-finite"),
                        (lambda s, m: s.update({name: s[name][..., :1].contiguous()}), "of shape"),
                        (lambda s, m: m.update(samples_done="four"), "not a count")):
        tensors, header = dict(state), dict(meta)
        tensors[name] = state[name].clone()
        edit(tensors, header)
        save_file(tensors, str(path), metadata=header)
        with pytest.raises(UsageError, match=f"Fisher checkpoint .*{words}.*delete it to start over"):
            compute_fisher(tiny_bert.model, batches, checkpoint=path, fingerprint="x", kind=tiny_bert.kind)


# ============================================================================= Hessian reports and journals
@pytest.fixture(scope="module")
def report_file(tiny_bert_dir, tiny_corpus_file, tmp_path_factory):
    from landscape.cli import main

    path = tmp_path_factory.mktemp("report") / "H.json"
    assert main([str(a) for a in ("hessian", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, *SAMPLE,
                                  "--top", 1, "--trace", 2, "--spectrum", 1, "--steps", 5, "--bins", 10,
                                  "--quiet", "--out", path)]) == 0
    return path


DAMAGE = {
    "no spectrum edges": (lambda r: r["spectrum"].pop("edges"), "no 'spectrum.edges'"),
    "density a string": (lambda r: r["spectrum"].update(density="0.5"), "'spectrum.density' is not a list"),
    "an eigenvalue a string": (lambda r: r.update(eigenvalues=["34.9"]), "'eigenvalues' is not a list of numbers"),
    "trace mean a string": (lambda r: r["trace"].update(mean="1.0"), "'trace.mean' is a string"),
    "no trace mean": (lambda r: r["trace"].pop("mean"), "no 'trace.mean'"),
    "residuals null": (lambda r: r["eigenpairs"].update(residuals=None), "'eigenpairs.residuals' is not a list"),
    "spectrum a list": (lambda r: r.update(spectrum=[1, 2]), "'spectrum' is a list, not an object"),
    "no provenance": (lambda r: r.pop("provenance"), "no 'provenance'"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_report_with_missing_or_mistyped_fields_is_one_line(case, report_file, write_surface, tmp_path, capfd):
    edit, words = DAMAGE[case]
    report = json.loads(report_file.read_text())
    edit(report)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    code, err = _cli(capfd, "plot", bad, "--kind", "spectrum", "--out", tmp_path / "s.png")
    _one_line(code, err, "Hessian report", "bad.json", words)
    surface = write_surface("a.h5", lambda x: 1 + x ** 2)
    code, err = _cli(capfd, "compare", surface, "--hessian", bad, "--out", tmp_path / "c.png")
    _one_line(code, err, "Hessian report", "bad.json", words)
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.csv"))


def test_the_report_written_passes_its_schema(report_file, tmp_path, capfd):
    assert _cli(capfd, "plot", report_file, "--kind", "spectrum", "--out", tmp_path / "s.png")[0] == 0


@pytest.mark.filterwarnings("ignore:.*attention")
def test_a_trace_journal_of_garbage_or_with_a_damaged_record_is_one_line(tiny_bert, tiny_bert_dir, tiny_corpus_file,
                                                                         tmp_path, capfd):
    from landscape import curvature
    from landscape.data.corpus import load_batches
    from landscape.journal import JsonLines

    out = tmp_path / "H.json"
    journal = tmp_path / "H.json.trace.ckpt"
    journal.write_bytes(bytes(range(256)) * 8)
    code, err = _cli(capfd, "hessian", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--top", 0,
                     "--trace", 3, "--quiet", "--out", out)
    _one_line(code, err, "H.json.trace.ckpt", "not a Hessian checkpoint")
    assert not out.exists()
    # A journal of this run whose record is edited: NaN, or a number where a hex string belongs.
    batches = load_batches(tiny_bert, tiny_corpus_file, max_samples=2, seq_len=16, batch_size=2)
    journal = tmp_path / "t.ckpt"
    hessian = curvature.HessianOperator(tiny_bert.model, batches, kind=tiny_bert.kind)
    clean = curvature.trace(hessian, samples=2, checkpoint=journal)
    header, first, second = journal.read_text().splitlines()
    assert curvature.trace(hessian, samples=2, checkpoint=journal) == clean  # resumed
    for record, words in (({"i": 0, "value": "nan"}, "line 2: value' is NaN"),
                          ({"i": 0, "value": 1.5}, "line 2: value' is a float"),
                          ({"value": "0x1p0"}, "no 'line 2.i'")):
        edited = JsonLines("hessian").record(record).decode()  # its CRC-32 intact: edited, not torn
        journal.write_text("\n".join([header, edited.rstrip("\n"), second]) + "\n")
        with pytest.raises(UsageError, match="damaged") as refused:
            curvature.trace(hessian, samples=2, checkpoint=journal)
        assert str(journal) in str(refused.value) and words in str(refused.value)


# ============================================================================= directions, surfaces, schedules
def test_integer_directions_and_non_finite_coordinates_and_bad_schedules_are_one_line(tiny_bert, tmp_path):
    import h5py
    import numpy as np

    from landscape import directions as D
    from landscape.guided import schedule
    from landscape.surface.file import read_surface

    dirs, settings = D.make_directions(tiny_bert.model, dims=1, seed=0)
    path = tmp_path / "d.h5"
    D.save_directions(path, dirs, settings)
    with h5py.File(path, "r+") as handle:
        name = sorted(handle["xdirection"])[0]
        values = np.asarray(handle["xdirection"][name][()])
        del handle["xdirection"][name]
        handle["xdirection"][name] = np.zeros(values.shape, dtype=np.int32)
    with pytest.raises(UsageError, match=f"'xdirection/{name}' is of dtype int32, not a float dataset"):
        D.load_directions(path)
    surface = tmp_path / "s.h5"
    with h5py.File(surface, "w") as handle:
        handle["xcoordinates"] = np.array([-1.0, 0.0, np.inf])
        handle["train_loss"] = np.ones(3)
    with pytest.raises(UsageError, match="'xcoordinates' .* non-finite"):
        read_surface(surface)
    schedule.save_schedule(schedule.uniform(tiny_bert.model, 0.1), tmp_path / "good.json")
    good = json.loads((tmp_path / "good.json").read_text())
    for edit, words in ((lambda d: d["sites"][0].update(p=float("nan")), r"'sites\[0\].p' is NaN"),
                        (lambda d: d["sites"][1].update(p=1.5), r"'sites\[1\].p' is 1.5, not below 1"),
                        (lambda d: d["sites"][0].pop("name"), r"no 'sites\[0\].name'"),
                        (lambda d: d.update(sites={}), "'sites' is not a list"),
                        (lambda d: d.update(format="landscape-hessian"), "is not a schedule file")):
        data = json.loads(json.dumps(good))
        edit(data)
        (tmp_path / "s.json").write_text(json.dumps(data))
        with pytest.raises(UsageError, match=words):
            schedule.load_schedule(tmp_path / "s.json")


# ============================================================================= the sweep's journal
def test_a_sweep_journal_cell_edited_to_nan_is_one_line(tiny_bert_dir, labelled, tmp_path, capfd):
    from landscape.guided.sweep import run_columns

    runs = tmp_path / "runs.csv"
    row = {"regularizer": "none", "fraction": "1.0", "seed": "0", "n_train": "6", "accuracy": "0.5", "f1": "0.6",
           "mcc": "0.0", "final_train_loss": "nan", "seconds": "0.2", "schedule_mean_p": "", "schedule_sha": "",
           "shuffle_seed": "", "settings": "c5dc063ccb5e", "reg_settings": "0cc476e6b2c0"}
    columns = run_columns("classification")
    assert list(row) == columns
    for column in ("seed", "fraction", "accuracy", "n_train"):
        edited = dict(row, **{column: "nan"})
        runs.write_text(",".join(columns) + "\n" + ",".join(edited.values()) + "\n")
        code, err = _cli(capfd, *_finetune(labelled("l.csv"), tmp_path / "ft.csv", "--runs-out", runs,
                                           model=tiny_bert_dir))
        _one_line(code, err, "runs.csv", f"line 2, column {column}")
        assert not (tmp_path / "ft.csv").exists()


def test_a_row_of_a_real_sweep_passes_and_a_diverged_loss_may_be_nan():
    from landscape.guided.sweep import check_run_row
    from landscape.schema import DamagedFile, Schema

    check = check_run_row("classification")
    row = {"regularizer": "none", "fraction": 1.0, "seed": 0, "n_train": 6, "accuracy": 0.5, "f1": 2 / 3,
           "mcc": 0.0, "final_train_loss": math.nan, "seconds": 0.2, "schedule_mean_p": None, "schedule_sha": None,
           "shuffle_seed": None, "settings": "c5dc063ccb5e", "reg_settings": "0cc476e6b2c0"}
    check(row, Schema("per-run CSV", "runs.csv"), "line 2")
    for column, value in (("accuracy", 1.5), ("mcc", -2.0), ("fraction", 0.0), ("seconds", -1.0)):
        with pytest.raises(DamagedFile, match=f"column {column}"):
            check(dict(row, **{column: value}), Schema("per-run CSV", "runs.csv"), "line 2")


# ============================================================================= labelled datasets
@pytest.mark.parametrize("label", ["nan", "inf", "-inf", "NaN"])
def test_nan_or_infinite_labels_are_one_line(label, tiny_bert_dir, labelled, tmp_path, capfd):
    from landscape.data.labelled import load_labelled

    dataset = labelled("l.csv", bad_label=label)
    code, err = _cli(capfd, *_finetune(dataset, tmp_path / "ft.csv", model=tiny_bert_dir))
    _one_line(code, err, "l.csv", f"label '{label}'", "row 3")
    for task in ("regression", "classification"):
        with pytest.raises(UsageError, match="finite numbers or class names"):
            load_labelled(str(dataset), task=task)
    assert not (tmp_path / "ft.csv").exists()
