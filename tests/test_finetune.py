"""Fine-tuning: data reading, metrics, a run that learns, and the data-paucity CLI end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import write_toy_tsv

from landscape.data import labelled as ft_data
from landscape.errors import UsageError
from landscape.guided import metrics as ft_metrics
from landscape.guided import training as ft


@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory):
    """A separable sentiment-like TSV: 60 rows, label 1 for one set of sentences, 0 for another."""
    return write_toy_tsv(tmp_path_factory.mktemp("toy") / "toy.tsv", rows=60)


def test_metrics_match_hand_computed_values():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    m = ft_metrics.compute_metrics("classification", y, p)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # phi = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*4 - 1*1) / sqrt(3*3*5*5)
    assert m["mcc"] == pytest.approx(7 / 15)
    r = ft_metrics.compute_metrics("regression", [1.0, 2.0, 3.0, 4.0], [1.0, 2.5, 2.9, 10.0])
    assert r["spearman"] == pytest.approx(1.0) and 0.8 < r["pearson"] < 1.0


def test_reads_tsv_csv_jsonl_and_infers_the_task(toy_tsv, tmp_path):
    train, test = ft_data.load_labelled(str(toy_tsv))
    assert test is None and len(train) == 60 and train.task == "classification"
    assert train.label_names == ["0", "1"] and set(train.labels) == {0, 1}
    reg = tmp_path / "reg.jsonl"
    reg.write_text("".join(json.dumps({"sentence": f"row {i}", "score": i / 7}) + "\n" for i in range(30)))
    data, _ = ft_data.load_labelled(str(reg), text_column="sentence", label_column="score")
    assert data.task == "regression" and data.labels[1] == pytest.approx(1 / 7)
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([["text", "label"], ["good film", "pos"], ["bad film", "neg"], ["ok", "pos"]])
    data, _ = ft_data.load_labelled(str(table))
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 1]
    with pytest.raises(UsageError, match="no column 'review'"):
        ft_data.load_labelled(str(toy_tsv), text_column="review")


def test_split_is_fixed_and_fractions_are_nested(toy_tsv):
    data, _ = ft_data.load_labelled(str(toy_tsv))
    a_train, a_test = ft_data.split_train_test(data, 0.25, seed=0)
    b_train, b_test = ft_data.split_train_test(data, 0.25, seed=0)
    assert a_test.texts == b_test.texts and len(a_test) == 15 and len(a_train) == 45
    big = ft_data.subsample(a_train, 1.0, seed=3, cap=40)
    small = ft_data.subsample(a_train, 0.25, seed=3, cap=40)
    assert len(big) == 40 and len(small) == 10
    assert small.texts == big.texts[:10]  # the 25% sample is inside the 100% sample


def test_a_run_learns_a_separable_task_and_saves_a_loadable_model(toy_tsv, tiny_bert_dir, tmp_path):
    data, _ = ft_data.load_labelled(str(toy_tsv))
    train, test = ft_data.split_train_test(data, 0.2, seed=0)
    config = ft.FinetuneConfig(lr=3e-3, batch_size=8, seq_len=16, epochs=6)
    metrics = ft.finetune_once(str(tiny_bert_dir), train, test, "dropout", seed=0, config=config,
                               save_dir=tmp_path / "m")
    assert metrics["accuracy"] >= 0.9  # chance is 0.5
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        logits = model(**tok(test.texts, padding=True, return_tensors="pt")).logits
    assert (logits.argmax(-1).numpy() == np.array(test.labels)).mean() == pytest.approx(metrics["accuracy"])


def test_cli_data_paucity_sweep_writes_summary_runs_and_plot(toy_tsv, tiny_bert, tiny_bert_dir, tmp_path, capsys):
    from landscape.cli import main
    from landscape.fisher import save_fisher

    fisher = {n: torch.rand_like(p) for n, p in tiny_bert.model.named_parameters()}
    save_fisher(tmp_path / "F.safetensors", fisher, {"model": "tiny"})
    out = tmp_path / "res.csv"
    code = main(["finetune", "--model", str(tiny_bert_dir), "--dataset", str(toy_tsv),
                 "--regularizer", "guided,r3f,gaussian", "--fisher", str(tmp_path / "F.safetensors"),
                 "--fractions", "1,0.5", "--restarts", "1", "--epochs", "1", "--batch-size", "16",
                 "--seq-len", "16", "--lr", "1e-3", "--device", "cpu", "--out", str(out)])
    assert code == 0
    summary = list(csv.DictReader(open(out)))
    runs = list(csv.DictReader(open(tmp_path / "res_runs.csv")))
    assert len(runs) == 3 * 2
    acc = [r for r in summary if r["metric"] == "accuracy"]
    assert {(r["regularizer"], float(r["fraction"])) for r in acc} == {
        (g, f) for g in ("guided", "r3f", "gaussian") for f in (1.0, 0.5)}
    assert all(float(r["q25"]) <= float(r["mean"]) <= float(r["q75"]) or r["runs"] == "1" for r in acc)
    assert (tmp_path / "res.png").stat().st_size > 1000
    assert "guided" in capsys.readouterr().out


def test_cli_refuses_bad_input_without_writing(toy_tsv, tiny_bert_dir, tmp_path, capsys):
    from landscape.cli import main

    out = tmp_path / "x.csv"
    base = ["finetune", "--model", str(tiny_bert_dir), "--dataset", str(toy_tsv), "--out", str(out)]
    assert main(base + ["--regularizer", "guided"]) == 2  # no schedule, no Fisher
    assert main(base + ["--regularizer", "dropconnect"]) == 2
    with pytest.raises(SystemExit) as stop:  # refused by argparse, as the option is parsed
        main(base + ["--fractions", "0,1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--schedule" in err and "dropconnect" in err and "--fractions" in err and "Traceback" not in err
    assert not out.exists()
