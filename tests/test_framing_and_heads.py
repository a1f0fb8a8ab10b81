"""Samples framed as the tokenizer frames a text, and checkpoints whose objective head is missing."""

import subprocess

import pytest
import torch
from conftest import cli_in_process, landscape_cmd, subprocess_env

from landscape import surface
from landscape.data.corpus import describe_framing, load_batches
from landscape.errors import NewHeadRefused, UsageError
from landscape.models import load_model


def test_llama_style_samples_all_start_with_bos(tiny_llama, tiny_corpus_file):
    bos = tiny_llama.tokenizer.bos_token_id
    batches = load_batches(tiny_llama, str(tiny_corpus_file), max_samples=8, seq_len=16, batch_size=4)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert len(ids) == 8 and (ids[:, 0] == bos).all()
    assert ids.shape[1] == 16  # the BOS is inside the sequence length, not added to it
    # Inside a sample, BOS appears nowhere else: documents are separated by EOS.
    assert (ids[:, 1:] != bos).all()
    assert "<s>" in describe_framing(tiny_llama.tokenizer)


def test_bos_override(tiny_llama, tiny_gpt2, tiny_corpus_file):
    no_bos = load_batches(tiny_llama, str(tiny_corpus_file), max_samples=4, seq_len=16, bos="no")
    assert (no_bos[0]["input_ids"][:, 0] != tiny_llama.tokenizer.bos_token_id).all()
    # GPT-2's tokenizer adds nothing around a text; 'yes' puts its BOS (<|endoftext|>) first.
    plain = load_batches(tiny_gpt2, str(tiny_corpus_file), max_samples=4, seq_len=16)
    forced = load_batches(tiny_gpt2, str(tiny_corpus_file), max_samples=4, seq_len=16, bos="yes")
    assert (plain[0]["input_ids"][:, 0] != tiny_gpt2.tokenizer.bos_token_id).any()
    assert (forced[0]["input_ids"][:, 0] == tiny_gpt2.tokenizer.bos_token_id).all()


def test_loss_at_the_origin_is_transformers_own(tiny_llama, tiny_gpt2, tiny_bert, tiny_corpus_file):
    for loaded in (tiny_llama, tiny_gpt2, tiny_bert):
        batches = load_batches(loaded, str(tiny_corpus_file), max_samples=6, seq_len=16, batch_size=6)
        assert len(batches) == 1
        ours, _ = surface.loss_and_accuracy(loaded.model, batches, loaded.kind)
        with torch.no_grad():
            theirs = float(loaded.model(**batches[0]).loss)
        assert ours == pytest.approx(theirs, rel=1e-5), loaded.kind


def test_a_missing_pretraining_head_is_refused(headless_bert_dir):
    with pytest.raises(NewHeadRefused, match="cls.predictions"):
        load_model(str(headless_bert_dir))
    loaded = load_model(str(headless_bert_dir), allow_new_head=True)
    assert loaded.kind == "mlm"


def _cli(*args, cwd):
    return subprocess.run(landscape_cmd(*args), cwd=cwd, env=subprocess_env(), capture_output=True, text=True)


@pytest.mark.slow
def test_commands_refuse_a_headless_checkpoint_in_one_line(headless_bert_dir, tiny_corpus_file, tmp_path, capfd):
    common = ["--model", headless_bert_dir, "--corpus", tiny_corpus_file, "--seq-len", 16, "--max-samples", 4]
    refused = _cli("fisher", *common, "--out", tmp_path / "F.safetensors", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--allow-new-head" in refused.stderr and "cls.predictions" in refused.stderr
    assert not (tmp_path / "F.safetensors").exists()
    # What is accepted runs in this process (the refusals, each a user's command, in their own).
    code, _, err = cli_in_process(capfd, "fisher", *common, "--allow-new-head", "--quiet", "--out",
                                  tmp_path / "F.safetensors")
    assert code == 0, err
    # Directions need only shapes, unless they are masked by a Fisher (which measures the head).
    code, _, err = cli_in_process(capfd, "directions", "--model", headless_bert_dir, "--dims", 1, "--out",
                                  tmp_path / "d.h5")
    assert code == 0, err
    masked = _cli("directions", "--model", headless_bert_dir, "--fisher", tmp_path / "F.safetensors",
                  "--subset", "top:5", "--out", tmp_path / "m.h5", cwd=tmp_path)
    assert masked.returncode == 2 and "--allow-new-head" in masked.stderr
    surf = _cli("surface", *common, "--directions", tmp_path / "d.h5", "--x=-1:1:3", "--out", tmp_path / "s.h5",
                cwd=tmp_path)
    assert surf.returncode == 2 and "--allow-new-head" in surf.stderr


def test_finetune_accepts_a_headless_checkpoint(headless_bert_dir, tmp_path):
    from landscape.data.labelled import LabelledData
    from landscape.guided.training import FinetuneConfig, finetune_once

    data = LabelledData(texts=["good film", "bad film", "great story", "awful plot"] * 4, labels=[1, 0, 1, 0] * 4,
                        task="classification", label_names=["0", "1"])
    metrics = finetune_once(str(headless_bert_dir), data, data, "dropout", seed=0,
                            config=FinetuneConfig(epochs=1, batch_size=8, seq_len=16))
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_unknown_bos_setting_is_a_usage_error(tiny_llama, tiny_corpus_file):
    with pytest.raises(UsageError, match="auto, yes or no"):
        load_batches(tiny_llama, str(tiny_corpus_file), max_samples=2, seq_len=16, bos="maybe")
