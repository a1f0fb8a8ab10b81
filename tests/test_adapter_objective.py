"""The objective is decided once, when a model loads, and a PEFT adapter's is its base model's.

Every stage evaluates the objective ``models.LoadedModel.kind`` carries.  A ``PeftModel`` hides its
base's class, so guessing the objective from the class once evaluated a LoRA on a masked LM as a
causal LM in ``surface`` and ``hessian`` (the embedded BERT's adapter: 8.694 nats at the origin
where transformers gives 8.620).  Here the loss each stage reports at the unperturbed weights is
transformers' own loss of the same adapted model on the same batch, and the Fisher is the mean
squared per-sample gradient of transformers' own per-sample loss.
"""

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import write_toy_tsv

from landscape.cli import main
from landscape.data.corpus import load_batches
from landscape.models import load_model

peft = pytest.importorskip("peft", reason="peft is the optional extra landscape[lora]")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 4)  # one batch: transformers' mean is ours


def _save_lora(model, config, path):
    """``model`` with LoRA ``config`` and nonzero B factors (so the adapter changes the outputs), saved."""
    torch.manual_seed(1)  # lora_A's initialization, and lora_B's below
    adapted = peft.get_peft_model(model, config)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    adapted.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir, tiny_gpt2_dir, tiny_corpus_file, tmp_path_factory):
    """{objective: (adapter folder, corpus)}: a LoRA on a masked LM, a causal LM and a classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from landscape.runtime import transformers_silenced

    root = tmp_path_factory.mktemp("adapters")
    bert = AutoModelForMaskedLM.from_pretrained(str(tiny_bert_dir))
    gpt2 = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    torch.manual_seed(0)
    with transformers_silenced():
        classifier = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    query_value = dict(r=2, lora_alpha=4, target_modules=["query", "value"])
    return {
        "mlm": (_save_lora(bert, peft.LoraConfig(**query_value), root / "bert"), tiny_corpus_file),
        "causal": (_save_lora(gpt2, peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, fan_in_fan_out=True,
                                                    target_modules=["c_attn"]), root / "gpt2"), tiny_corpus_file),
        # the classifier's pooler is new on a masked-LM checkpoint: saved with the adapter, as finetune does
        "classification": (_save_lora(classifier, peft.LoraConfig(task_type="SEQ_CLS", modules_to_save=["pooler"],
                                                                  **query_value), root / "classifier"),
                           write_toy_tsv(root / "toy.tsv", rows=8)),
    }


def _cli(*args):
    assert main([str(a) for a in args]) == 0
    return args[-1]


def _transformers_loss(loaded, corpus):
    """transformers' own loss (``model(**batch).loss``) of the adapted model on the stages' one batch."""
    (batch,) = load_batches(loaded, str(corpus), max_samples=4, seq_len=16, batch_size=4)
    with torch.no_grad():
        return float(loaded.model(**batch).loss), batch


@pytest.mark.parametrize("objective", ["mlm", "causal", "classification"])
def test_an_adapters_surface_is_evaluated_on_its_base_models_objective(objective, adapters, tmp_path):
    from landscape.surface.file import read_surface

    folder, corpus = adapters[objective]
    loaded = load_model(str(folder))
    assert loaded.kind == objective and loaded.adapter  # decided at load: the base's objective
    theirs, _ = _transformers_loss(loaded, corpus)
    _cli("directions", "--model", folder, "--dims", 1, "--out", tmp_path / "d.h5")
    surface = read_surface(_cli("surface", "--model", folder, "--directions", tmp_path / "d.h5", "--corpus", corpus,
                                *SAMPLE, "--x", "-1:1:3", "--out", tmp_path / "s.h5"))
    assert surface.z[1] == pytest.approx(theirs, rel=1e-6)  # x = 0: the adapted model itself


@pytest.mark.parametrize("objective", ["mlm", "causal", "classification"])
def test_an_adapters_hessian_is_that_of_its_base_models_objective(objective, adapters, tmp_path):
    folder, corpus = adapters[objective]
    theirs, _ = _transformers_loss(load_model(str(folder)), corpus)
    report = json.loads(_cli("hessian", "--model", folder, "--corpus", corpus, *SAMPLE, "--top", 1, "--tol", 1e-2,
                             "--quiet", "--out", tmp_path / "H.json").read_text())
    assert report["provenance"]["objective"] == objective
    assert report["loss"] == pytest.approx(theirs, rel=1e-5)  # the products' attention may be eager
    # `directions --kind hessian` runs the same Lanczos on the same objective: the same top eigenvalue
    with h5py.File(_cli("directions", "--kind", "hessian", "--model", folder, "--corpus", corpus, *SAMPLE, "--dims", 1,
                        "--tol", 1e-2, "--out", tmp_path / "v.h5"), "r") as handle:
        assert float(handle.attrs["eigenvalues"][0]) == pytest.approx(report["eigenvalues"][0], rel=1e-6)


@pytest.mark.parametrize("objective", ["mlm", "causal", "classification"])
def test_an_adapters_fisher_is_that_of_transformers_per_sample_loss(objective, adapters, tmp_path):
    from landscape.fisher import load_fisher

    folder, corpus = adapters[objective]
    fisher, meta = load_fisher(_cli("fisher", "--model", folder, "--corpus", corpus, *SAMPLE, "--quiet",
                                    "--out", tmp_path / "F.safetensors"))
    assert meta["objective"] == objective
    loaded = load_model(str(folder))
    _, batch = _transformers_loss(loaded, corpus)
    factors = {n: p for n, p in loaded.model.named_parameters() if ".lora_" in n}
    expected = {n: torch.zeros_like(p) for n, p in factors.items()}
    rows = batch["labels"].shape[0]
    for row in range(rows):
        sample = {k: v[row: row + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loaded.model(**sample).loss, list(factors.values()))
        for name, grad in zip(factors, grads):
            expected[name] += grad.square() / rows
    for name in factors:
        np.testing.assert_allclose(fisher[name].numpy(), expected[name].numpy(), rtol=1e-4, atol=1e-10)


def test_a_bare_module_is_never_evaluated_without_its_objective(tiny_bert, tiny_corpus_file):
    """The functions on a module in memory take the objective with it; none guesses it from the class."""
    from landscape import curvature, directions, surface
    from landscape.data.objectives import sequence_losses
    from landscape.errors import UsageError
    from landscape.fisher import compute_fisher
    from landscape.fisher.accumulator import FisherAccumulator

    model = tiny_bert.model
    batches = load_batches(tiny_bert, str(tiny_corpus_file), max_samples=2, seq_len=16, batch_size=2)
    refusals = {
        "sequence_losses": lambda: sequence_losses(model, batches[0], None),
        "surface.evaluate": lambda: surface.evaluate(model, [directions.random_direction(model, seed=0)], batches,
                                                     [0.0]),
        "loss_and_accuracy": lambda: surface.loss_and_accuracy(model, batches, None),
        "FisherAccumulator": lambda: FisherAccumulator(model),
        "HessianOperator": lambda: curvature.HessianOperator(model, batches),
        "a misspelt objective": lambda: surface.loss_and_accuracy(model, batches, "masked"),
    }
    for what, call in refusals.items():
        with pytest.raises(UsageError, match="objective must be one of"):
            call()
            pytest.fail(what)
    with pytest.raises(TypeError, match="kind"):  # a required keyword
        compute_fisher(model, batches)
