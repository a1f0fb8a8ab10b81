"""Fisher stability over nested sub-samples (paper Table 1)."""

import csv

import pytest
import torch

from landscape import cli
from landscape.data.corpus import load_batches
from landscape.fisher.stability import compare, spearman, stability


def test_compare_identical_and_reversed_estimates():
    ref = {"a": torch.arange(1.0, 101.0).reshape(10, 10), "b": torch.tensor([0.5, 200.0])}
    same = compare(ref, ref, top=(5, 1))
    assert same["top5_overlap"] == 1 and same["top1_jaccard"] == 1
    assert same["spearman"] == pytest.approx(1.0) and same["rel_l1"] == pytest.approx(0.0)
    ref = {"a": torch.arange(1.0, 101.0)}
    flipped = compare({"a": torch.arange(100.0, 0.0, -1.0)}, ref, top=(5,))
    assert flipped["top5_overlap"] == 0 and flipped["spearman"] == pytest.approx(-1.0)
    lost_top = ref["a"].clone()
    lost_top[-1] = 0.0  # the largest element drops out of the top 5
    row = compare({"a": lost_top}, ref, top=(5,))
    assert row["top5_overlap"] == pytest.approx(4 / 5) and row["top5_jaccard"] == pytest.approx(4 / 6)
    assert row["rel_l1"] == pytest.approx(2 * 100 / 5050, rel=1e-9)  # the lost 100 and the rescaled rest
    doubled = {k: 2 * v for k, v in ref.items()}  # the normalized Fisher ignores scale
    assert compare(doubled, ref)["rel_l1"] == pytest.approx(0.0, abs=1e-12)


def test_spearman_handles_ties_like_scipy():
    from scipy.stats import spearmanr

    a = [0, 0, 1, 2, 2, 3, 7]
    b = [1, 0, 0, 2, 5, 3, 3]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_stability_rows_one_pass(tiny_bert, tiny_corpus_file):
    batches = load_batches(tiny_bert, tiny_corpus_file, seq_len=16, batch_size=4)
    total = sum(b["labels"].shape[0] for b in batches)
    forwards = []
    handle = tiny_bert.model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        rows = stability(tiny_bert.model, batches, fractions=(0.5, 0.1), top=(5, 1), kind=tiny_bert.kind)
    finally:
        handle.remove()
    assert len(forwards) == len(batches)  # one pass over the reference sample
    assert [r["samples"] for r in rows] == [total, round(0.5 * total), max(1, round(0.1 * total))]
    assert rows[0]["spearman"] == pytest.approx(1.0) and rows[0]["top5_overlap"] == 1
    # More samples agree better with the reference than fewer.
    assert rows[1]["spearman"] > rows[2]["spearman"] and rows[1]["rel_l1"] < rows[2]["rel_l1"]


def test_cli_stability_writes_csv_and_prints_table(tiny_bert_dir, tiny_corpus_file, tmp_path, capsys):
    out = tmp_path / "S.csv"
    code = cli.main(["stability", "--model", str(tiny_bert_dir), "--corpus", str(tiny_corpus_file),
                     "--seq-len", "16", "--batch-size", "8", "--fractions", "0.5,0.25", "--top", "5,1",
                     "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["fraction"] for r in rows] == ["1", "0.5", "0.25"]
    assert {"top5_overlap", "top1_jaccard", "spearman", "rel_l1"} <= set(rows[0])
    assert "spearman" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--fractions", "0.5,2"), ("--fractions", "abc"), ("--top", "0")])
def test_cli_stability_rejects_bad_numbers(flag, value, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "S.csv"
    with pytest.raises(SystemExit) as stop:  # refused by argparse, as the option is parsed
        cli.main(["stability", "--model", str(tiny_bert_dir), flag, value, "--out", str(out)])
    code = stop.value.code
    err = capsys.readouterr().err
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1 and not out.exists()
