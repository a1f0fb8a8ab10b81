"""Issue 13: controls for guided dropout, mixout and ChildTuning-D in the fine-tuning sweep, the paired
statistics against dropout, and sweeps that resume from their per-run CSV after a kill."""

import csv
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_when, landscape_cmd, subprocess_env, write_toy_tsv

from landscape.data import labelled as ft_data
from landscape.errors import SettingsMismatch
from landscape.guided import schedule as sched
from landscape.guided import sweep
from landscape.guided import training as ft
from landscape.guided.stats import paired_comparison
from landscape.guided.sweep import RunJournal

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--fractions", "1", "--epochs", "1", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-3",
        "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory):
    return write_toy_tsv(tmp_path_factory.mktemp("toy") / "toy.tsv", rows=40)


@pytest.fixture(scope="module")
def toy(toy_tsv):
    data, _ = ft_data.load_labelled(str(toy_tsv))
    return ft_data.split_train_test(data, 0.2, seed=0)


def _classifier(model_dir, train):
    torch.manual_seed(0)
    return ft.load_classifier(str(model_dir), train)[0]


def _guided(model):
    """A linear guided schedule over the model's sites from a made-up Fisher (parameter k: (k + 1)^2)."""
    fisher = {n: torch.full_like(p, float((k + 1) ** 2)) for k, (n, p) in enumerate(model.named_parameters())}
    return sched.guided_dropout(model, fisher, p_upper=0.3, p_lower=0.0)


@pytest.fixture(scope="module")
def schedule_file(tiny_bert_dir, toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("schedule") / "schedule.json"
    sched.save_schedule(_guided(_classifier(tiny_bert_dir, toy[0])), path)
    return path


# ---------------------------------------------------------------------------------------- controls

def test_dropout_matched_sets_every_scheduled_site_to_the_mean_p(tiny_bert_dir, toy):
    model = _classifier(tiny_bert_dir, toy[0])
    guided = _guided(model)
    config = ft.FinetuneConfig(dropout=0.1)
    ft.prepare_regularizer(model, "dropout-matched", config, guided)
    used = sched.current_probabilities(model)
    mean = float(np.mean([s.p for s in guided.sites]))
    assert len({s.p for s in guided.sites}) > 3 and mean == pytest.approx(0.15)
    assert {name: used[name] for name in guided.probabilities()} == pytest.approx(
        dict.fromkeys(guided.probabilities(), mean))
    assert all(used[name] == 0.1 for name in guided.unscored)  # the new head's dropout: --dropout
    with pytest.raises(Exception, match="needs a guided dropout schedule"):
        ft.prepare_regularizer(model, "dropout-matched", config, None)


def test_guided_shuffled_is_a_permutation_that_changes_with_the_restart_seed(tiny_bert_dir, toy):
    model = _classifier(tiny_bert_dir, toy[0])
    guided = _guided(model)
    ps = {seed: ft.run_schedule("guided-shuffled", guided, seed).probabilities() for seed in range(3)}
    for seed, p in ps.items():
        assert sorted(p.values()) == sorted(guided.probabilities().values())  # the same multiset, same sites
        ft.prepare_regularizer(model, "guided-shuffled", ft.FinetuneConfig(), guided, seed=seed)
        assert {n: sched.current_probabilities(model)[n] for n in p} == p  # what the run really uses
    assert ps[0] != ps[1] != ps[2] != ps[0] and ps[0] != guided.probabilities()
    assert ft.run_schedule("guided-shuffled", guided, 1).probabilities() == ps[1]  # seeded


def test_the_sweep_records_the_schedule_each_run_used(tiny_bert_dir, toy, tmp_path, one_thread):
    train, test = toy
    guided = _guided(_classifier(tiny_bert_dir, train))
    config = ft.FinetuneConfig(lr=1e-3, batch_size=16, seq_len=16, epochs=1)
    regs = ["guided", "dropout-matched", "guided-shuffled", "dropout"]
    rows = sweep.data_paucity(str(tiny_bert_dir), train, test, regs, restarts=2, config=config, guided=guided,
                              show_progress=False, runs_path=tmp_path / "runs.csv")
    by = {(r["regularizer"], r["seed"]): r for r in rows}
    mean = sched.mean_p(guided)
    for reg in ("guided", "dropout-matched", "guided-shuffled"):
        assert [by[(reg, s)]["schedule_mean_p"] for s in (0, 1)] == pytest.approx([mean, mean])
    assert by[("guided", 0)]["schedule_sha"] == by[("guided", 1)]["schedule_sha"] == sched.assignment_hash(guided)
    shuffled = [by[("guided-shuffled", s)] for s in (0, 1)]
    assert [r["shuffle_seed"] for r in shuffled] == [0, 1]
    assert [r["schedule_sha"] for r in shuffled] == [
        sched.assignment_hash(sched.shuffled(guided, s)) for s in (0, 1)]
    assert len({r["schedule_sha"] for r in shuffled} | {by[("guided", 0)]["schedule_sha"]}) == 3
    assert by[("dropout", 0)]["schedule_mean_p"] is None and by[("dropout", 0)]["shuffle_seed"] is None
    on_disk = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [r["schedule_sha"] for r in on_disk] == [r["schedule_sha"] or "" for r in rows]


# ------------------------------------------------------------------------------ mixout, childtuning

def test_mixout_and_spectral_norm_removal_leave_each_other_alone(tiny_bert_dir, toy):
    from torch.nn.utils import parametrize

    from landscape import regularizers as regs

    model = _classifier(tiny_bert_dir, toy[0])
    ft.prepare_regularizer(model, "mixout", ft.FinetuneConfig(dropout=0.1, mixout_p=0.7))
    mixed = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(mixed) == 2 * 6 + 1 and mixed[0].parametrizations["weight"][0].p == 0.7  # q k v o i o, pooler
    assert set(sched.current_probabilities(model).values()) == {0.0}  # dropout off under mixout
    regs.remove_spectral_norm(model)
    assert all(parametrize.is_parametrized(m, "weight") for m in mixed)  # not stripped as if R4F
    ft.undo_regularizer(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(sched.current_probabilities(model).values()) == {0.1}


def test_mixout_and_childtuning_train_and_save_plain_models(tiny_bert_dir, toy_tsv, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForMaskedLM

    from landscape.cli import main

    saved = tmp_path / "models"
    code = main(["finetune", "--model", str(tiny_bert_dir), "--dataset", str(toy_tsv), "--regularizer",
                 "mixout,childtuning", "--restarts", "1", "--childtuning-reserve", "0.2", "--save-models",
                 str(saved), "--out", str(tmp_path / "s.csv"), *FAST])
    assert code == 0, capsys.readouterr().err
    runs = {r["regularizer"]: r for r in csv.DictReader(open(tmp_path / "s_runs.csv"))}
    pretrained = BertForMaskedLM.from_pretrained(str(tiny_bert_dir)).state_dict()
    _, test = ft_data.split_train_test(ft_data.load_labelled(str(toy_tsv))[0], 0.2, seed=0)
    changed = {}
    for reg in ("mixout", "childtuning"):
        folder = saved / f"{reg}_f1_s0"
        model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        state = model.state_dict()
        assert not any("parametrizations" in k or "original" in k for k in state)
        tok = AutoTokenizer.from_pretrained(str(folder))
        with torch.no_grad():
            logits = model(**tok(test.texts, padding=True, return_tensors="pt")).logits
        accuracy = float((logits.argmax(-1).numpy() == np.array(test.labels)).mean())
        assert accuracy == pytest.approx(float(runs[reg]["accuracy"]))
        common = [k for k in state if k in pretrained and "embeddings.position_ids" not in k]
        moved = sum(int((state[k] != pretrained[k]).sum()) for k in common)
        changed[reg] = moved / sum(state[k].numel() for k in common)
    body = sum(p.numel() for n, p in model.named_parameters() if n.startswith("bert."))
    covered = sum(pretrained[k].numel() for k in common)
    assert 0.1 < changed["mixout"]  # trained: the body moved
    assert 0 < changed["childtuning"] <= round(0.2 * body) / covered  # only the child moved


# ---------------------------------------------------------------------------------------- statistics

def _constructed_rows():
    """dropout and guided over 6 seeds at two fractions; guided = dropout + known differences;
    r3f only at fraction 1 with one seed; 'none' at a fraction where dropout has no runs."""
    rows = []
    base = [0.60, 0.62, 0.58, 0.65, 0.61, 0.59]
    plus = {1.0: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06], 0.5: [0.02, -0.01, 0.03, -0.02, 0.01, -0.03]}
    for f in (1.0, 0.5):
        for s in range(6):
            rows.append({"regularizer": "dropout", "fraction": f, "seed": s, "n_train": int(100 * f),
                         "accuracy": base[s]})
            rows.append({"regularizer": "guided", "fraction": f, "seed": s, "n_train": int(100 * f),
                         "accuracy": base[s] + plus[f][s]})
    rows.append({"regularizer": "r3f", "fraction": 1.0, "seed": 2, "n_train": 100, "accuracy": 0.5})
    rows.append({"regularizer": "none", "fraction": 0.25, "seed": 0, "n_train": 25, "accuracy": 0.5})
    return rows, base, plus


def test_summary_columns_on_a_constructed_example(tmp_path):
    from scipy.stats import wilcoxon

    from landscape.files import write_csv

    rows, base, plus = _constructed_rows()
    summary = sweep.summarize_runs(rows, ["accuracy"])
    cell = {(r["regularizer"], r["fraction"]): r for r in summary}
    for f in (1.0, 0.5):
        g, d = cell[("guided", f)], cell[("dropout", f)]
        assert g["diff_vs_dropout"] == pytest.approx(np.mean(plus[f]))
        expected = paired_comparison([b + p for b, p in zip(base, plus[f])], base, seed=0)
        assert (g["ci_low"], g["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high))
        assert g["ci_low"] <= g["diff_vs_dropout"] <= g["ci_high"]
        assert g["p_value"] == pytest.approx(wilcoxon(plus[f]).pvalue) and g["pairs"] == 6
        assert d["diff_vs_dropout"] is d["ci_low"] is d["ci_high"] is d["p_value"] is None
    assert cell[("guided", 1.0)]["p_value"] == pytest.approx(2 / 64) and cell[("guided", 1.0)]["ci_low"] > 0
    assert cell[("guided", 1.0)]["significant"] is True and cell[("guided", 0.5)]["significant"] is False
    r3f = cell[("r3f", 1.0)]  # one pair: a difference, no interval or test
    assert r3f["diff_vs_dropout"] == pytest.approx(0.5 - base[2]) and r3f["pairs"] == 1 and np.isnan(r3f["p_value"])
    assert cell[("none", 0.25)]["diff_vs_dropout"] is None  # no dropout runs at that fraction
    write_csv(summary, tmp_path / "s.csv")
    written = {(r["regularizer"], float(r["fraction"])): r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert {"diff_vs_dropout", "ci_low", "ci_high", "p_value"} <= set(written[("dropout", 1.0)])
    assert written[("dropout", 1.0)]["p_value"] == "" and written[("none", 0.25)]["ci_low"] == ""
    assert float(written[("guided", 1.0)]["diff_vs_dropout"]) == pytest.approx(0.035)
    table = sweep.format_summary(summary, "accuracy")
    guided_line = next(line for line in table.splitlines() if line.startswith("guided"))
    assert guided_line.count("*") == 1 and "p=0.031*" in table
    assert sweep.plot_paucity(summary, "accuracy", tmp_path / "p.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------- resuming

def test_journal_drops_a_torn_last_line_and_refuses_other_columns(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_bytes(b"regularizer,fraction,seed,acc\ndropout,1.0,0,0.5\ndropout,1.0,1,0.")
    with RunJournal(path, ["regularizer", "fraction", "seed", "acc"], text_columns=["regularizer"]) as journal:
        assert journal.dropped_tail and journal.rows == [{"regularizer": "dropout", "fraction": 1.0, "seed": 0,
                                                          "acc": 0.5}]
        journal.append({"regularizer": "dropout", "fraction": 1.0, "seed": 1, "acc": 0.25})
    assert path.read_text() == "regularizer,fraction,seed,acc\ndropout,1.0,0,0.5\ndropout,1.0,1,0.25\n"
    with pytest.raises(SettingsMismatch, match="columns of another sweep"):
        RunJournal(path, ["regularizer", "fraction", "seed", "f1"])
    with RunJournal(path, ["a"], overwrite=True) as journal:
        assert journal.rows == []
    assert path.read_text() == "a\n"


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(tiny_bert_dir, toy_tsv, schedule_file, tmp_path,
                                                             capsys):
    from landscape.cli import main

    out = tmp_path / "res.csv"
    runs = tmp_path / "res_runs.csv"
    args = ["finetune", "--model", str(tiny_bert_dir), "--dataset", str(toy_tsv), "--regularizer",
            "dropout,guided-shuffled", "--schedule", str(schedule_file), "--fractions", "1", "--epochs", "3",
            "--batch-size", "8", "--seq-len", "16", "--lr", "1e-3", "--threads", "1", "--device", "cpu",
            "--restarts", "8", "--out", str(out)]
    proc = subprocess.Popen(landscape_cmd(*args), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, 3, runs)  # header + 2 finished runs
    killed = runs.read_bytes()
    finished = killed[:killed.rfind(b"\n") + 1].decode().splitlines()[1:]
    assert 2 <= len(finished) < 16 and not out.exists()
    if killed.endswith(b"\n"):  # make the kill's worst case explicit: a torn last line
        with open(runs, "ab") as handle:
            handle.write(finished[-1].encode()[:25])

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {runs}: {len(finished)} of 16 runs already done, a torn last line dropped" in printed
    lines = runs.read_text().splitlines()
    assert lines[1:1 + len(finished)] == finished  # finished runs kept byte for byte (their 'seconds' too)
    table = list(csv.DictReader(open(runs)))
    keys = [(r["regularizer"], r["fraction"], r["seed"]) for r in table]
    assert len(table) == 16 and len(set(keys)) == 16  # every run exactly once
    assert {r["shuffle_seed"] for r in table if r["regularizer"] == "guided-shuffled"} == {str(s) for s in range(8)}
    summary = list(csv.DictReader(open(out)))
    assert {r["pairs"] for r in summary if r["regularizer"] == "guided-shuffled"} == {"8"}

    assert main(args) == 0  # nothing left: reruns nothing, same summary
    assert "16 of 16 runs already done" in capsys.readouterr().out and runs.read_text().splitlines() == lines

    changed = list(args)
    changed[changed.index("--lr") + 1] = "2e-3"
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "lr 0.001 -> 0.002" in err
    other = tmp_path / "other.json"
    guided = sched.load_schedule(schedule_file)
    sched.save_schedule(sched.shuffled(guided, 99), other)
    changed = list(args)
    changed[changed.index("--schedule") + 1] = str(other)
    assert main(changed) == 2
    assert "guided-shuffled runs made with another guided schedule" in capsys.readouterr().err
    assert runs.read_text().splitlines() == lines  # refused: nothing touched

    assert main(args[:-4] + ["--restarts", "1", "--overwrite", "--out", str(out)]) == 0
    assert len(list(csv.DictReader(open(runs)))) == 2


@pytest.mark.slow  # a real kill of a real run: about 5-20 s
def test_finetune_overwrite_killed_mid_sweep_keeps_the_finished_sweep_whole(tiny_bert_dir, toy_tsv, tmp_path,
                                                                           capsys):
    # `finetune --overwrite` killed mid-sweep once had already replaced the finished sweep's journal:
    # the folder paired the old summary with another sweep's runs.
    from landscape.cli import main

    out, runs, plot = tmp_path / "res.csv", tmp_path / "res_runs.csv", tmp_path / "res.png"
    args = ["finetune", "--model", str(tiny_bert_dir), "--dataset", str(toy_tsv), "--regularizer", "none,dropout",
            "--epochs", "3", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-3", "--threads", "1",
            "--device", "cpu", "--restarts", "1", "--out", str(out)]
    assert main(args) == 0
    finished = {p: p.read_bytes() for p in (out, runs, plot, Path(f"{runs}.settings.json"))}
    other = [*args[:-4], "--restarts", "6", "--out", str(out), "--overwrite"]
    other[other.index("--lr") + 1] = "2e-3"
    staged = tmp_path / ".res_runs.csv.new.csv"
    proc = subprocess.Popen(landscape_cmd(*other), cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, 3, staged)  # header + 2 runs of the new sweep
    assert {p: p.read_bytes() for p in finished} == finished  # the finished sweep, whole
    done = staged.read_bytes().count(b"\n") - 1
    assert main(other) == 0  # resumes the replacement, then puts all of it in place
    assert f"resuming the replacement of {runs}: {done} of 12 runs already done" in capsys.readouterr().out
    table = list(csv.DictReader(open(runs)))
    assert len(table) == 12 and {r["settings"] for r in table} != {r["settings"] for r in
                                                                   csv.DictReader(io.StringIO(finished[runs].decode()))}
    assert {r["pairs"] for r in csv.DictReader(open(out)) if r["regularizer"] == "none"} == {"6"}
    assert plot.read_bytes() != finished[plot]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -------------------------------------------------------------------------------------- Llama-style

@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_gpt2_dir, tmp_path_factory):
    """A tiny LlamaForCausalLM folder (no dropout modules: attention_dropout floats only)."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                            pad_token_id=tok.pad_token_id)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_every_regularizer_runs_on_a_llama_style_causal_lm_folder(tiny_llama_dir, toy_tsv, tmp_path, capsys):
    import transformers as tf

    from landscape.cli import main
    from landscape.fisher import save_fisher
    from landscape.guided.sites import find_sites

    lm = tf.LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))
    save_fisher(tmp_path / "F.safetensors", {n: torch.rand_like(p) for n, p in lm.named_parameters()}, {})
    code = main(["finetune", "--model", str(tiny_llama_dir), "--dataset", str(toy_tsv), "--regularizer",
                 ",".join(ft.REGULARIZERS), "--fisher", str(tmp_path / "F.safetensors"), "--restarts", "1",
                 "--save-models", str(tmp_path / "m"), "--out", str(tmp_path / "s.csv"), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no dropout sites" not in captured.out
    runs = {r["regularizer"]: r for r in csv.DictReader(open(tmp_path / "s_runs.csv"))}
    assert set(runs) == set(ft.REGULARIZERS) and all(r["accuracy"] != "" for r in runs.values())
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m" / "mixout_f1_s0"))
    sites = [s.name for s in find_sites(model)]
    assert sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]  # attention dropout only
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_r3f_on_a_llama_classifier_pools_from_each_rows_last_real_token(tiny_llama_dir, toy):
    from landscape import regularizers as regs
    from landscape.data.labelled import encode, labelled_batch

    model, tok = ft.load_classifier(str(tiny_llama_dir), toy[0])
    encoded = encode(tok, toy[0], 64)
    pick = list({len(r["input_ids"]): i for i, r in enumerate(encoded)}.values())[:4]
    assert len(pick) > 1  # rows of different lengths: the batch is right-padded
    batch = labelled_batch(encoded, toy[0].labels, pick, model.config.pad_token_id, "classification", "cpu")
    model.eval()
    total, clean, penalty = regs.r3f_loss(model, batch, lam=1.0, sigma=0.0)
    assert torch.equal(clean, model(**batch).loss) and penalty.item() == 0.0  # same pooling as evaluation
    assert regs.r3f_loss(model, batch, lam=1.0, sigma=0.1)[2].item() > 0
