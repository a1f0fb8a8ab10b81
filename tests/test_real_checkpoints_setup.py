"""The real checkpoints that data/build_checkpoints.py builds load with plain transformers, offline.

Each test skips, saying why, when its checkpoint cannot be downloaded or converted here.
"""
import json

import pytest
import torch
from real_checkpoints import MINILM, SMOLLM2, real_checkpoint

pytestmark = pytest.mark.slow  # real checkpoints (data/build_checkpoints.py)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_checkpoint(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return folder, model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_smollm2_is_a_135m_llama(smollm2):
    folder, model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.model_type == "llama"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert model.dtype == torch.float32
    n = sum(p.numel() for p in model.parameters())          # tied lm_head counted once
    assert 134_000_000 < n < 136_000_000, n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tok) == model.config.vocab_size == 49152


def test_smollm2_tokenizer_framing(smollm2):
    _, _, tok = smollm2
    assert tok("hello world")["input_ids"] == tok("hello world", add_special_tokens=False)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_smollm2_weights_are_pretrained(smollm2):
    # A random init scores ~ln(49152) = 10.8 nats; the dequantized model is far below.
    _, model, tok = smollm2
    ids = torch.tensor([tok("The river runs through the old town and under seven stone bridges. "
                            "Farmers bring apples, pears and cheese to the market every Saturday.")
                        ["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0, loss


def test_minilm_is_a_headless_bert():
    from transformers import AutoModel, AutoTokenizer

    folder = real_checkpoint(MINILM)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert type(model).__name__ == "BertModel"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    n = sum(p.numel() for p in model.parameters())
    assert 22_000_000 < n < 23_000_000, n
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok("Hello World")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["hello", "world"]
