"""Trust under faults (issue 11): no silent wrong number, no lost work, one line for every bad input.

Faults are real: SIGKILL/SIGINT/SIGSTOP sent to running processes, files cut or overwritten on
disk, a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as on a full disk),
a read-only tmpfs mounted in a private mount namespace, /proc (which refuses new files even to
root, where permission bits stop nothing), an unreachable hub.  Commands run through the CLI: in a
subprocess where the fault needs one (signals, limits, environment), in-process otherwise.

"One line" means what a terminal shows: stderr split at newlines, each part as its last
carriage-return segment (a progress bar redraws itself with \\r), one non-empty line in all.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, TEXT, ctrl_c_as_in_a_terminal
from conftest import cli_in_process as _cli
from conftest import landscape_cmd as _cmd
from conftest import one_line as _one_line
from conftest import shown_lines as _shown_lines
from conftest import subprocess_env as _env

from landscape import directions as D
from landscape import surface as S
from landscape.surface import file as surface_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _decoded(done):
    # Bytes, decoded here: text=True would turn a progress bar's carriage returns into newlines.
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    return done


def _run(*args, env=None, preexec_fn=None, timeout=300, wrapper=()):
    return _decoded(subprocess.run([*wrapper, *_cmd(*args)], cwd=ROOT, env=env or _env(), capture_output=True,
                                   timeout=timeout, preexec_fn=preexec_fn))


def _records(out):
    path = S.journal_path(out)
    return path.read_bytes().count(b"\n") - 1 if path.exists() else 0


def _wait_records(proc, out, count, limit=120):
    deadline = time.time() + limit
    while _records(out) < count and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert _records(out) >= count


def _grids(path):
    with h5py.File(path, "r") as handle:
        return np.asarray(handle["train_loss"][()]), np.asarray(handle["train_acc"][()])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dir_file(tiny_bert_dir, tmp_path_factory):
    from landscape.models import load_model

    loaded = load_model(str(tiny_bert_dir))
    dirs, settings = D.make_directions(loaded.model, dims=2, seed=0)
    path = tmp_path_factory.mktemp("dirs") / "d.h5"
    D.save_directions(path, dirs, settings)
    return path


def _surface_args(model_dir, dir_file, corpus, out, *extra, batch=5, x="-1:1:20", y="-1:1:10", samples=12):
    return ["surface", "--model", model_dir, "--directions", dir_file, "--corpus", corpus,
            "--max-samples", samples, "--seq-len", 16, "--batch-size", batch, "--x", x, "--y", y,
            "--out", out, *extra]


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, dir_file, tiny_corpus_file, tmp_path_factory):
    """An uninterrupted 20x10 surface, by the CLI in a subprocess (batch size 5)."""
    out = tmp_path_factory.mktemp("reference") / "ref.h5"
    done = _run(*_surface_args(tiny_bert_dir, dir_file, tiny_corpus_file, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def small(tiny_bert_dir, dir_file, tiny_corpus_file, tmp_path_factory):
    """(argument builder, reference file) of a small 5x4 surface computed in this process."""
    folder = tmp_path_factory.mktemp("small")

    def args(out, *extra):
        return _surface_args(tiny_bert_dir, dir_file, tiny_corpus_file, out, *extra, x="-1:1:5", y="-1:1:4",
                             samples=4)

    from landscape.cli import main

    assert main([str(a) for a in args(folder / "ref.h5")]) == 0
    return args, folder / "ref.h5"


@pytest.fixture
def fisher_file(tiny_bert_dir, tiny_corpus_file, tmp_path, capfd):
    out = tmp_path / "F.safetensors"
    code, _, err = _cli(capfd, "fisher", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--max-samples", 8,
                        "--seq-len", 16, "--quiet", "--out", out)
    assert code == 0, err
    return out


def _edited_fisher(source, path, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        meta = handle.metadata()
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture
def labelled_csv(tmp_path):
    """12 labelled rows and one short row (a text, no label: csv gives None for the label)."""
    path = tmp_path / "labelled.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{i % 2}\n' for i, t in enumerate(TEXT))
                    + "a row that lost its label\n")
    return path


# ============================================================================= wrong results, lost work
@pytest.mark.slow
def test_torn_journal_kill_cut_resume_kill_finish_equals_uninterrupted(tiny_bert_dir, dir_file, tiny_corpus_file,
                                                                       reference, tmp_path):
    out = tmp_path / "s.h5"
    cmd = _cmd(*_surface_args(tiny_bert_dir, dir_file, tiny_corpus_file, out))
    # (1) kill -9 after 3 journal records
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_records(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # (2) cut the last record to its first byte
    data = S.journal_path(out).read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    S.journal_path(out).write_bytes(data[: last + 1])
    kept = _records(out)
    assert kept >= 2  # at least two whole records, then one byte of a record
    # (3) resume and kill -9 again, after 3 more records
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_records(proc, out, kept + 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # (4) finish
    done = _decoded(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True))
    assert done.returncode == 0, done.stderr
    assert "200 in the grid" in done.stdout
    loss, acc = _grids(out)
    ref_loss, ref_acc = _grids(reference)
    np.testing.assert_array_equal(loss, ref_loss)  # bit for bit
    np.testing.assert_array_equal(acc, ref_acc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no journal, no partial files


def test_other_settings_never_replace_a_file_silently(tiny_bert_dir, tiny_corpus_file, tmp_path, capfd):
    out = tmp_path / "F.safetensors"
    base = ["fisher", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--seq-len", 16, "--quiet",
            "--out", out]
    assert _cli(capfd, *base, "--max-samples", 8)[0] == 0
    before = out.read_bytes()
    code, _, err = _cli(capfd, *base, "--max-samples", 4)
    _one_line(code, err, "max_samples", "--overwrite")
    assert out.read_bytes() == before
    assert _cli(capfd, *base, "--max-samples", 4, "--overwrite")[0] == 0
    from landscape.fisher import load_fisher

    assert load_fisher(out)[1]["samples"] == "4"
    # directions: the same
    dout = tmp_path / "d.h5"
    assert _cli(capfd, "directions", "--model", tiny_bert_dir, "--out", dout)[0] == 0
    before = dout.read_bytes()
    code, _, err = _cli(capfd, "directions", "--model", tiny_bert_dir, "--seed", 1, "--out", dout)
    _one_line(code, err, "seed", "--overwrite")
    assert dout.read_bytes() == before
    assert _cli(capfd, "directions", "--model", tiny_bert_dir, "--seed", 1, "--out", dout, "--overwrite")[0] == 0
    assert D.load_directions(dout)[1]["seed"] == 1


def test_unwritable_outputs_are_refused_before_any_computation(tiny_bert_dir, tmp_path, capfd):
    # Every command names a model folder and an input that do not exist: the refusal that comes
    # out is the output's, so the output was checked before anything was loaded or computed.
    missing = tmp_path / "missing"
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, not a folder")
    outs = [(blocker / "F.safetensors", "is a file, not a folder")]
    if sys.platform.startswith("linux"):
        outs.append((Path("/proc/landscape-faults-test.safetensors"), "cannot be written"))  # refuses even root
    if os.geteuid() != 0:  # permission bits stop only other users than root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        outs.append((locked / "F.safetensors", "Permission denied"))
    for out, words in outs:
        started = time.perf_counter()
        code, _, err = _cli(capfd, "fisher", "--model", missing, "--corpus", missing / "c.jsonl", "--out", out)
        _one_line(code, err, str(out), words)
        assert time.perf_counter() - started < 5 and not out.exists()
    for flag, value, words in (("--out", Path("/proc/landscape-faults.csv"), "cannot be written"),
                               ("--out", blocker / "x.csv", "is a file"),
                               ("--plot", "x.txt", ".png")):
        args = {"--out": tmp_path / "sum.csv", flag: value}
        code, _, err = _cli(capfd, "finetune", "--model", missing, "--dataset", missing / "d.csv",
                            *[a for pair in args.items() for a in pair])
        _one_line(code, err, flag, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a-file"] + (["locked"] if os.geteuid() else []))


def _ro_mount_works(folder):
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$1" && touch "$1/x"', "sh",
                            str(folder)], capture_output=True, text=True) if shutil.which("unshare") else None
    return probe is not None and "Read-only file system" in probe.stderr


@pytest.mark.slow
def test_read_only_file_system_is_one_line(tiny_bert_dir, tiny_corpus_file, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _ro_mount_works(ro):
        pytest.skip("cannot mount a read-only tmpfs in a private mount namespace here (unshare -m)")
    # The mount exists only inside the command's own mount namespace and goes away with it.
    wrapper = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"', "sh", str(ro)]
    done = _run("fisher", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--max-samples", 2,
                "--seq-len", 16, "--out", ro / "F.safetensors", wrapper=wrapper)
    _one_line(done.returncode, done.stderr, "Read-only file system", "F.safetensors")


def test_a_schedule_for_another_model_is_refused_before_the_first_run(tiny_bert_dir, tiny_gpt2, tmp_path, capfd):
    from landscape.guided import schedule

    gpt2_schedule = tmp_path / "gpt2.json"
    schedule.save_schedule(schedule.uniform(tiny_gpt2.model, 0.1), gpt2_schedule)
    data = tmp_path / "d.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXT * 3)))
    out = tmp_path / "sum.csv"
    code, stdout, err = _cli(capfd, "finetune", "--model", tiny_bert_dir, "--dataset", data, "--regularizer",
                             "dropout,guided", "--schedule", gpt2_schedule, "--out", out)
    _one_line(code, err, "another model")
    assert "fine-tuning" not in err and "runs in" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tsv", "gpt2.json"]


# ----------------------------------------------------------------------------- non-finite values
def test_non_finite_direction_file_is_one_line(tiny_bert, dir_file, small, tmp_path, capfd):
    dirs, settings = D.make_directions(tiny_bert.model, dims=2, seed=0)
    name = next(iter(dirs[1]))
    dirs[1][name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.h5"
    D.save_directions(bad, dirs, settings)
    args, _ = small
    code, _, err = _cli(capfd, *[bad if a == dir_file else a for a in args(tmp_path / "s.h5")])
    _one_line(code, err, "non-finite", name)
    assert not (tmp_path / "s.h5").exists() and not S.journal_path(tmp_path / "s.h5").exists()


def test_a_diverged_loss_is_inf_computed_once_and_drawn(tiny_bert_dir, tiny_corpus_file, tmp_path, capfd):
    from landscape.models import load_model

    # Coordinates are bounded (±1e6), so the divergence comes from a steep direction: finite float32
    # weights of 1e28 whose activations overflow, as a model that really diverges does.
    dirs, settings = D.make_directions(load_model(str(tiny_bert_dir)).model, dims=1, seed=0)
    steep = tmp_path / "steep.h5"
    D.save_directions(steep, [{name: values * 1e28 for name, values in dirs[0].items()}], settings)

    def args(out, x):
        return ["surface", "--model", tiny_bert_dir, "--directions", steep, "--corpus", tiny_corpus_file,
                "--max-samples", 4, "--seq-len", 16, "--one-d", f"--x={x}", "--out", out]

    out = tmp_path / "div.h5"
    assert _cli(capfd, *args(out, "-1:1:3"))[0] == 0
    loss, acc = _grids(out)
    assert loss[0] == loss[2] == np.inf and np.isfinite(loss[1]) and not np.isnan(acc).any()
    with h5py.File(out, "r") as handle:
        assert handle.attrs["points_done"] == 3
    code, stdout, _ = _cli(capfd, *args(out, "-1:1:3"))
    assert code == 0 and "0 point(s) computed now" in stdout  # +inf is computed, not missing
    assert _cli(capfd, "plot", out, "--out", tmp_path / "div.png")[0] == 0  # draws the finite point
    everywhere = tmp_path / "all.h5"
    assert _cli(capfd, *args(everywhere, "0.5:1:2"))[0] == 0
    assert (_grids(everywhere)[0] == np.inf).all()
    code, _, err = _cli(capfd, "plot", everywhere, "--out", tmp_path / "all.png")
    line = _one_line(code, err, "diverged")
    assert "run or resume" not in line and not (tmp_path / "all.png").exists()


def test_nan_or_negative_fisher_is_refused_and_schedules_are_strict_json(tiny_bert, tiny_bert_dir, fisher_file,
                                                                         tmp_path, capfd):
    for value, words in ((float("nan"), "non-finite"), (-1.0, "negative")):
        bad = _edited_fisher(fisher_file, tmp_path / f"bad{value}.safetensors", value)
        code, _, err = _cli(capfd, "directions", "--model", tiny_bert_dir, "--fisher", bad, "--subset", "top:5",
                            "--out", tmp_path / "d.h5")
        _one_line(code, err, words)
        code, _, err = _cli(capfd, "schedule", bad, "--model", tiny_bert_dir, "--out", tmp_path / "s.json")
        _one_line(code, err, words)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"] * 3

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in a schedule file"))

    assert _cli(capfd, "schedule", fisher_file, "--model", tiny_bert_dir, "--out", tmp_path / "s.json")[0] == 0
    strict((tmp_path / "s.json").read_text())
    from landscape.guided import schedule

    uniform = tmp_path / "uniform.json"  # a uniform schedule has no scores: null, not NaN
    schedule.save_schedule(schedule.uniform(tiny_bert.model, 0.1), uniform)
    assert all(site["score"] is None for site in strict(uniform.read_text())["sites"])
    back = schedule.load_schedule(uniform)
    assert all(np.isnan(s.score) for s in back.sites) and back.probabilities() == {
        s.name: 0.1 for s in back.sites}


def test_a_row_without_a_label_is_skipped_not_a_class(tiny_bert_dir, labelled_csv, tmp_path, capfd):
    from landscape.data.labelled import load_labelled

    data, _ = load_labelled(str(labelled_csv))
    assert data.skipped == 1 and len(data) == len(TEXT)
    assert data.label_names == ["0", "1"]
    code, stdout, err = _cli(capfd, "finetune", "--model", tiny_bert_dir, "--dataset", labelled_csv,
                             "--regularizer", "none", "--epochs", 1, "--seq-len", 16, "--batch-size", 4,
                             "--threads", 1, "--out", tmp_path / "sum.csv")
    assert code == 0, err
    assert "skipped 1 row(s) without a text or a label" in stdout


def test_max_samples_below_one_on_a_classifier_is_one_line(classifier_dir, tmp_path, capfd):
    labelled = tmp_path / "l.tsv"
    labelled.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXT)))
    code, _, err = _cli(capfd, "directions", "--model", classifier_dir, "--out", tmp_path / "d.h5")
    assert code == 0, err
    for bad in (-1, 0):
        code, _, err = _cli(capfd, "surface", "--model", classifier_dir, "--corpus", labelled, "--directions",
                            tmp_path / "d.h5", f"--max-samples={bad}", "--x=-1:1:3", "--one-d",
                            "--out", tmp_path / "s.h5")
        _one_line(code, err, "max-samples", str(bad))
    assert not (tmp_path / "s.h5").exists()


# ============================================================================= tracebacks that are one line
@pytest.mark.slow
def test_unsafe_pickled_weights_are_one_line(tiny_bert_dir, tiny_corpus_file, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    for name in os.listdir(tiny_bert_dir):
        if name != "model.safetensors":
            shutil.copy(Path(tiny_bert_dir) / name, model / name)
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling it would run a shell command
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"bert.embeddings.word_embeddings.weight": Payload()}, model / "pytorch_model.bin")
    done = _run("fisher", "--model", model, "--corpus", tiny_corpus_file, "--out", tmp_path / "F.safetensors")
    _one_line(done.returncode, done.stderr, "cannot be loaded safely", "safetensors")
    assert not marker.exists() and not (tmp_path / "F.safetensors").exists()


def _file_size_limit(limit):
    def apply():  # in the child: EFBIG instead of the signal that would kill it, as a full disk behaves
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_full_disk_keeps_the_finished_points_and_a_rerun_finishes(small, tmp_path, capfd):
    args, ref = small
    # 6 kB: the journal (header and records) fits, the HDF5 file (~9 kB) does not.
    out = tmp_path / "s.h5"
    done = _run(*args(out, "--flush-seconds", 0), preexec_fn=_file_size_limit(6000))
    line = _one_line(done.returncode, done.stderr, "File too large", f"'{S.journal_path(out)}'", "rerun")
    assert "--overwrite" not in line
    kept = _records(out)
    assert kept >= 1 and not out.exists()
    code, stdout, err = _cli(capfd, *args(out))
    assert code == 0, err
    assert f"{20 - kept} point(s) computed now" in stdout
    for mine, theirs in zip(_grids(out), _grids(ref)):
        np.testing.assert_array_equal(mine, theirs)
    # 2 kB: now the journal itself fills up
    out2 = tmp_path / "s2.h5"
    done = _run(*args(out2), preexec_fn=_file_size_limit(2000))
    _one_line(done.returncode, done.stderr, "File too large", f"'{S.journal_path(out2)}'", "rerun")
    assert _cli(capfd, *args(out2))[0] == 0
    for mine, theirs in zip(_grids(out2), _grids(ref)):
        np.testing.assert_array_equal(mine, theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "s2.h5"]


@pytest.mark.slow
def test_full_disk_is_one_line_for_fisher_and_directions(tiny_bert_dir, tiny_corpus_file, tmp_path):
    done = _run("fisher", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--max-samples", 2,
                "--seq-len", 16, "--quiet", "--out", tmp_path / "F.safetensors", preexec_fn=_file_size_limit(20000))
    _one_line(done.returncode, done.stderr, "cannot write", "F.safetensors", "File too large")
    done = _run("directions", "--model", tiny_bert_dir, "--out", tmp_path / "d.h5",
                preexec_fn=_file_size_limit(20000))
    _one_line(done.returncode, done.stderr, "cannot write", "d.h5", "File too large")
    assert list(tmp_path.iterdir()) == []  # no partial files left behind


def test_an_existing_folder_as_out_is_one_line(small, dir_file, fisher_file, tiny_bert_dir, tmp_path, capfd):
    args, ref = small
    folder = tmp_path / "taken.h5"
    folder.mkdir()
    code, _, err = _cli(capfd, *args(folder))
    line = _one_line(code, err, "is a folder")
    assert "--overwrite" not in line
    _one_line(*_cli(capfd, *args(folder), "--overwrite")[::2], "is a folder")
    _one_line(*_cli(capfd, "directions", "--model", tiny_bert_dir, "--out", folder)[::2], "is a folder")
    for name, command in (("taken.png", ["plot", ref]), ("taken.json", ["schedule", fisher_file,
                                                                        "--model", tiny_bert_dir])):
        (tmp_path / name).mkdir()
        _one_line(*_cli(capfd, *command, "--out", tmp_path / name)[::2], "is a folder")


def _overwrite(path, offset, data):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _header_address(path, name):
    with h5py.File(path, "r") as handle:
        return h5py.h5o.get_info(handle[name].id).addr


def test_damaged_direction_files_are_one_line(small, dir_file, tmp_path, capfd):
    args, _ = small
    header = tmp_path / "header.h5"  # HDF5 internals: the object header of a group
    shutil.copy(dir_file, header)
    _overwrite(header, _header_address(header, "xdirection"), b"\xa5" * 64)
    middle = tmp_path / "middle.h5"  # bytes in the middle of the file: here, a tensor's values
    shutil.copy(dir_file, middle)
    _overwrite(middle, middle.stat().st_size // 2, bytes(range(256)))
    for bad in (header, middle):
        code, _, err = _cli(capfd, *[bad if a == dir_file else a for a in args(tmp_path / "s.h5")])
        _one_line(code, err, "direction file", "damaged")
    assert not (tmp_path / "s.h5").exists()


def test_damaged_surface_files_are_one_line_when_resumed_or_plotted(small, tmp_path, capfd):
    args, ref = small
    header = tmp_path / "header.h5"
    shutil.copy(ref, header)
    _overwrite(header, _header_address(header, "train_loss"), b"\xa5" * 64)
    values = tmp_path / "values.h5"  # the losses themselves: caught by the checksums
    shutil.copy(ref, values)
    with h5py.File(values, "r") as handle:
        offset = handle["train_loss"].id.get_offset()
    _overwrite(values, offset + 8, np.float64(1.0).tobytes())
    for bad in (header, values):
        before = bad.read_bytes()
        _one_line(*_cli(capfd, *args(bad))[::2], str(bad), "--overwrite")
        _one_line(*_cli(capfd, "plot", bad, "--out", tmp_path / "p.png")[::2], "damaged")
        assert bad.read_bytes() == before and not S.journal_path(bad).exists()
    assert not (tmp_path / "p.png").exists()


def _old_record(index, *values):
    """A point's record in the previous release's journal format (``landscape-surface-journal/2``)."""
    body = " ".join([str(index)] + [float(v).hex() for v in values])
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def test_a_damaged_journal_is_one_line_and_a_damaged_last_record_is_recomputed(small, tmp_path, capfd):
    args, ref = small
    loss, acc = (g.reshape(-1) for g in _grids(ref))
    with h5py.File(ref, "r") as handle:
        identity = handle.attrs["identity"]
    header = f"landscape-surface-journal/2 {identity}\n".encode()
    good = _old_record(0, loss[0], acc[0]) + _old_record(1, loss[1], acc[1])
    after = _old_record(2, 123.0, 0.5)  # intact, but after a damaged record: not what a crash leaves
    journals = {"records": (header + good + b"\xff\xfe\xc3(\x80 not utf-8\n" + after, "line 4 is not an intact"),
                "header": (header[:40] + b"\xff\xfe" + header[42:] + good + after, "not a surface journal"),
                "garbage": (bytes(range(256)) * 4, "not a surface journal")}
    for name, (journal, words) in journals.items():
        out = tmp_path / f"{name}.h5"
        S.journal_path(out).write_bytes(journal)
        _one_line(*_cli(capfd, *args(out))[::2], str(S.journal_path(out)), words)
        assert S.journal_path(out).read_bytes() == journal and not out.exists()  # nothing changed
        assert _cli(capfd, *args(out), "--overwrite")[0] == 0  # the way on: start afresh
        for mine, theirs in zip(_grids(out), _grids(ref)):
            np.testing.assert_array_equal(mine, theirs)
        assert not S.journal_path(out).exists()
    # A damaged last record is what a crash can leave: dropped and recomputed, in either format.
    new = tmp_path / "new.h5"
    assert _cli(capfd, *args(new))[0] == 0
    for name, start in (("old", header + good), ("new", None)):
        out = tmp_path / f"last-{name}.h5"
        if start is None:  # this release's journal of the same two points
            surface_file.open_journal(out, json.loads(identity), 2, loss.size).append(
                surface_file.record(0, loss[0], acc[0]), surface_file.record(1, loss[1], acc[1]))
            start = S.journal_path(out).read_bytes()
        S.journal_path(out).write_bytes(start + b"\xff\xfe not a record\n")
        code, stdout, err = _cli(capfd, *args(out))
        assert code == 0, err
        assert "18 point(s) computed now" in stdout  # the two records before the damaged last one
        for mine, theirs in zip(_grids(out), _grids(ref)):
            np.testing.assert_array_equal(mine, theirs)


def test_a_surface_file_whose_identity_is_not_json_is_one_line(small, tmp_path, capfd):
    args, ref = small
    out = tmp_path / "s.h5"
    shutil.copy(ref, out)
    with h5py.File(out, "r+") as handle:
        handle.attrs["identity"] = "{not json"
    _one_line(*_cli(capfd, *args(out))[::2], "identity", "--overwrite")
    assert _cli(capfd, *args(out), "--overwrite")[0] == 0
    for mine, theirs in zip(_grids(out), _grids(ref)):
        np.testing.assert_array_equal(mine, theirs)


def test_other_bad_inputs_are_one_line(small, dir_file, fisher_file, tiny_bert_dir, tmp_path, capfd):
    args, _ = small
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps([t, i % 2]) + "\n" for i, t in enumerate(TEXT)))
    _one_line(*_cli(capfd, "finetune", "--model", tiny_bert_dir, "--dataset", rows, "--out",
                    tmp_path / "x.csv")[::2], "row 1", "JSON object")
    # The grid is refused before the model is looked at (that folder does not exist).
    huge = args(tmp_path / "huge.h5")
    huge[huge.index("--model") + 1] = tmp_path / "no-model"
    huge[huge.index("--x") + 1] = huge[huge.index("--y") + 1] = "-1:1:100000"
    _one_line(*_cli(capfd, *huge)[::2], "10,000,000,000 points", "too large")
    _one_line(*_cli(capfd, "fisher", "--model", tiny_bert_dir, "--max-chunk-mb", "nan", "--out",
                    tmp_path / "F.safetensors")[::2], "--max-chunk-mb", "nan")
    _one_line(*_cli(capfd, "schedule", fisher_file, "--model", tiny_bert_dir, "--shape", "power", "--gamma", "-2",
                    "--out", tmp_path / "s.json")[::2], "--gamma")
    _one_line(*_cli(capfd, *args(tmp_path / "s.png"))[::2], ".h5")
    _one_line(*_cli(capfd, "directions", "--model", tiny_bert_dir, "--out", tmp_path / "d.json")[::2], ".h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F.safetensors", "rows.jsonl"]


# ============================================================================= messages that mislead
@pytest.mark.slow
def test_resume_with_another_batch_size_after_ctrl_c_while_a_second_run_is_refused(tiny_bert_dir, dir_file,
                                                                                   tiny_corpus_file, reference,
                                                                                   tmp_path):
    out = tmp_path / "s.h5"
    first = subprocess.Popen(_cmd(*_surface_args(tiny_bert_dir, dir_file, tiny_corpus_file, out, batch=5)),
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        _wait_records(first, out, 3)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the file
        second = _run(*_surface_args(tiny_bert_dir, dir_file, tiny_corpus_file, out, batch=3))
        _one_line(second.returncode, second.stderr, "another run is writing")
        # Ctrl-C while frozen: it is handled as soon as the run continues, so the run cannot
        # finish its grid first (sending it after SIGCONT raced with the last points once).
        first.send_signal(signal.SIGINT)
    finally:
        first.send_signal(signal.SIGCONT)
    err = first.communicate(timeout=120)[1].decode()
    assert first.returncode == 130 and _shown_lines(err)[-1].endswith("finished work is kept, rerun to resume")
    kept = _records(out)
    assert kept >= 3
    resumed = _run(*_surface_args(tiny_bert_dir, dir_file, tiny_corpus_file, out, batch=3))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{200 - kept} point(s) computed now" in resumed.stdout
    for mine, theirs in zip(_grids(out), _grids(reference)):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("flag, name", [("--model", "mymodel"), ("--corpus", "mycorpus")])
def test_a_mistyped_hub_name_is_one_line_and_quick(flag, name, tmp_path):
    # HF_HUB_OFFLINE unset: the hub is tried for real, and this machine cannot reach it.
    from landscape.hub import reachable

    if reachable():
        pytest.skip("the Hugging Face hub is reachable from here")
    started = time.perf_counter()
    done = _run("fisher", flag, name, "--out", tmp_path / "F.safetensors", env=_env(HF_HUB_OFFLINE=None),
                timeout=120)
    elapsed = time.perf_counter() - started
    _one_line(done.returncode, done.stderr, f"'{name}'", "Hugging Face")
    assert elapsed < 15, f"{elapsed:.1f} s"
