"""Model adapters: the right head from the config, clear errors for bad models, the embedded model."""

import json

import pytest
import torch

from landscape.datahome import EMBEDDED_MODEL_DIR as DEFAULT_MODEL_DIR
from landscape.errors import UsageError
from landscape.models import kind_from_config, load_model


@pytest.mark.parametrize("fixture, kind, cls", [
    ("tiny_bert_dir", "mlm", "BertForMaskedLM"),
    ("tiny_gpt2_dir", "causal", "GPT2LMHeadModel"),
    ("tiny_t5_dir", "seq2seq", "T5ForConditionalGeneration"),
])
def test_head_is_chosen_from_the_config(request, fixture, kind, cls):
    loaded = load_model(str(request.getfixturevalue(fixture)))
    assert loaded.kind == kind
    assert type(loaded.model).__name__ == cls
    assert not loaded.model.training


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2_dir", "tiny_t5_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_load_holds_the_buffers_of_transformers_own_load(request, fixture, dtype):
    # Module.to(dtype) would round the Llama's rotary frequencies too; from_pretrained keeps them float32.
    folder = str(request.getfixturevalue(fixture))
    model = load_model(folder, dtype=dtype).model
    ours, theirs = dict(model.named_buffers()), dict(type(model).from_pretrained(folder, dtype=dtype).named_buffers())
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


def test_config_without_architectures_still_gets_a_head():
    from transformers import BertConfig, GPT2Config, T5Config

    assert kind_from_config(BertConfig()) == "mlm"
    assert kind_from_config(GPT2Config()) == "causal"
    assert kind_from_config(T5Config()) == "seq2seq"


def test_missing_model_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "no_such_model") + "/")


def test_folder_without_config_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("model_type", ["no_such_architecture", "vit"])
def test_unknown_architecture_is_a_usage_error(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UsageError, match="unknown architecture"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="cannot load model"):
        load_model("landscape-tests/no-such-model")


def test_embedded_model_loads_with_plain_transformers():
    from transformers import AutoTokenizer, BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(DEFAULT_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    assert model.config.num_hidden_layers >= 4
    assert 128 <= model.config.hidden_size <= 256
    assert 7000 <= len(tokenizer) <= 9000
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20


@pytest.mark.slow
def test_embedded_model_beats_the_unigram_baseline_on_heldout_text():
    """A real check of pretraining: on held-out masked tokens, the model's cross-entropy is well
    below that of the train split's unigram distribution (add-one smoothed), as the card says."""
    from landscape.data.corpus import load_batches, load_documents
    from landscape.data.embedded_text import embedded_text
    from landscape.data.objectives import IGNORE_INDEX, sequence_losses

    loaded = load_model(None)
    batches = load_batches(loaded, corpus=str(embedded_text('heldout')), max_samples=64, batch_size=16)
    with torch.inference_mode():
        parts = [sequence_losses(loaded.model, b, loaded.kind) for b in batches]
    model_ce = float(sum(p.loss_sum.sum() for p in parts) / sum(p.n_tokens.sum() for p in parts))

    vocab = len(loaded.tokenizer)
    counts = torch.ones(vocab)
    for ids in loaded.tokenizer(load_documents(None), add_special_tokens=False, verbose=False)["input_ids"]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab)
    log_p = torch.log(counts / counts.sum())
    targets = torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in batches])
    unigram_ce = float(-log_p[targets].mean())
    assert model_ce < unigram_ce - 0.3, (model_ce, unigram_ce)
