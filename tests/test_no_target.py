"""A sample with no target token: refused in one line where samples are made, before any stage writes.

A target token is a label other than -100 that the objective scores (``objectives.target_tokens``).
A masked-LM sample of unknown tokens alone has none: one word longer than the tokenizer splits
(``DDDD…``, one [UNK]) or text in a script the vocabulary lacks (CJK on an English BERT).  Every
stage that evaluates a loss once went on with it: ``fisher`` wrote an all-zero Fisher with exit 0,
``surface`` left an all-NaN file and its journal behind.
"""

import pytest
import torch
from conftest import TEXT
from conftest import cli_in_process as _cli
from conftest import one_line as _one_line

from landscape import directions as D
from landscape.data.corpus import make_samples
from landscape.data.objectives import check_targets, target_tokens
from landscape.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 2)
CORPORA = {"one overlong word": "D" * 3000 + "\n",
           "CJK on an English vocabulary": "这是一个测试句子，没有英文。\n" * 20}


@pytest.fixture(scope="module", params=sorted(CORPORA))
def no_target_corpus(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(CORPORA[request.param])
    return path


@pytest.fixture(scope="module")
def bert_directions(tiny_bert_dir, tmp_path_factory):
    from landscape.models import load_model

    dirs, settings = D.make_directions(load_model(str(tiny_bert_dir)).model, dims=2, seed=0)
    path = tmp_path_factory.mktemp("dirs") / "d.h5"
    D.save_directions(path, dirs, settings)
    return path


def _stages(model, corpus, good, dirs, out):
    """Every command that evaluates a loss on a corpus, with its output in ``out``."""
    surface = ("surface", "--model", model, "--directions", dirs, *SAMPLE, "--x", "-1:1:3", "--y", "-1:1:3")
    return {
        "fisher": ("fisher", "--model", model, "--corpus", corpus, *SAMPLE, "--quiet", "--out", out / "F.safetensors"),
        "stability": ("stability", "--model", model, "--corpus", corpus, *SAMPLE, "--fractions", 0.5, "--quiet",
                      "--out", out / "t.csv"),
        "surface": (*surface, "--corpus", corpus, "--out", out / "s.h5"),
        "surface --eval-corpus": (*surface, "--corpus", good, "--eval-corpus", corpus, "--out", out / "s.h5"),
        "directions --kind hessian": ("directions", "--kind", "hessian", "--model", model, "--corpus", corpus,
                                      *SAMPLE, "--out", out / "d.h5"),
        "hessian": ("hessian", "--model", model, "--corpus", corpus, *SAMPLE, "--top", 1, "--quiet",
                    "--out", out / "H.json"),
    }


@pytest.mark.parametrize("stage", ["fisher", "stability", "surface", "surface --eval-corpus",
                                   "directions --kind hessian", "hessian"])
def test_every_stage_refuses_a_sample_without_a_target_in_one_line_and_writes_nothing(
        stage, no_target_corpus, tiny_bert_dir, tiny_corpus_file, bert_directions, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    args = _stages(tiny_bert_dir, no_target_corpus, tiny_corpus_file, bert_directions, out)[stage]
    code, _, err = _cli(capfd, *args)
    _one_line(code, err, "no target token", "[UNK]")
    assert sorted(p.name for p in out.iterdir()) == []  # no output, journal, checkpoint or lock left


def test_a_sample_with_some_sequences_without_targets_is_accepted(tiny_bert):
    """The refusal is about the whole sample: sequences of [UNK] alone beside English ones are fine."""
    # Seven one-[UNK] documents, each with its [SEP], fill the first 16-token sequence (14 + framing).
    samples = make_samples(tiny_bert.tokenizer, "mlm", ["D" * 3000] * 7 + TEXT, seq_len=16)
    per_sequence = [target_tokens(s, "mlm") for s in samples]
    assert per_sequence[0] == 0 and all(per_sequence[1:])
    check_targets(samples, "mlm")


def test_target_tokens_follow_the_objective():
    labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
    assert target_tokens({"labels": labels}, "mlm") == 3
    assert target_tokens({"labels": labels}, "causal") == 1  # the first position predicts nothing
    assert target_tokens({"labels": torch.tensor([1, 0, 1])}, "classification") == 3
    with pytest.raises(UsageError, match="no target token"):
        check_targets([{"labels": torch.tensor([[5, -100]])}], "causal")
    with pytest.raises(UsageError, match="objective must be one of"):
        target_tokens({"labels": labels}, "masked")


def test_make_samples_refuses_unknown_tokens_alone(tiny_bert):
    with pytest.raises(UsageError, match=r"no target token: in its 1 sequence every token is \[UNK\]"):
        make_samples(tiny_bert.tokenizer, "mlm", ["D" * 3000], seq_len=16)
