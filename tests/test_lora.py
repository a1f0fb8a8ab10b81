"""LoRA: guided LoRA dropout (sites, schedules, that the p's act in training and not in eval), and
fine-tuning with ``--lora`` whose saved adapters PEFT loads."""

import csv
import json

import pytest
import torch
from conftest import write_toy_tsv

from landscape.errors import UsageError

peft = pytest.importorskip("peft", reason="peft is the optional extra landscape[lora]")

from landscape.guided import lora  # noqa: E402
from landscape.guided import schedule as sched  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lora_llama(tiny_llama):
    """The tiny Llama as a causal LM with rank-2 LoRA on q_proj, v_proj and down_proj."""
    return lora.wrap(tiny_llama.model, lora.parse_lora_spec("r=2,alpha=4,targets=q_proj,v_proj+down_proj"),
                     "CAUSAL_LM")


def _fisher(model):
    """A base-model Fisher whose scores order the layers: layer 1 above layer 0, v_proj above q_proj."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        name = lora.base_parameter_name(name)  # the fixture's model may be wrapped in place already
        scale = 1.0 + ("layers.1." in name) * 10 + ("v_proj" in name) * 3 + ("down_proj" in name) * 0.5
        out[name] = torch.full_like(p, scale)
    return out


def test_spec_parsing_and_refusals():
    assert lora.parse_lora_spec("r=8,alpha=16,targets=q_proj,v_proj") == {"r": 8, "alpha": 16.0,
                                                                         "targets": ["q_proj", "v_proj"]}
    assert lora.parse_lora_spec("r=4") == {"r": 4, "alpha": 8.0, "targets": None}
    assert lora.parse_lora_spec("layers=2-4+7,targets=q_proj")["layers"] == [2, 3, 4, 7]
    for bad, words in (("r=0", "at least 1"), ("r=100000000", "at most 65536"), ("r=8,alpha=inf", "finite"),
                       ("rank=4", "unknown key"), ("r=x", "must be a number"),
                       ("dropout=0.1", "unknown key"), ("layers=a-b", "block indices")):
        with pytest.raises(UsageError, match=words):
            lora.parse_lora_spec(bad)
    with pytest.raises(UsageError, match="mixout mixes trained body weights"):
        lora.check_lora_regularizers(["dropout", "mixout"])


def test_lora_sites_are_the_base_modules_and_one_schedule_serves_any_rank(tiny_llama, lora_llama):
    fisher = _fisher(tiny_llama.model)
    sites = lora.lora_sites(lora_llama)
    assert [s.name for s in sites] == [f"model.layers.{i}.{m}" for i in (0, 1)
                                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert sites[0].param_names == ["model.layers.0.self_attn.q_proj.weight"]
    schedule = lora.lora_schedule(lora_llama, fisher, p_upper=0.2, p_lower=0.0)
    ranked = [s.name for s in sorted(schedule.sites, key=lambda s: s.rank)]
    assert ranked[0] == "model.layers.0.self_attn.q_proj" and ranked[-1] == "model.layers.1.self_attn.v_proj"
    assert schedule.sites[0].p == pytest.approx(0.2) and schedule.sites[-1].p == pytest.approx(0.0)
    # A Fisher computed on the PeftModel itself (base weights under .base_layer.) gives the same schedule.
    peft_fisher = {n: fisher[lora.base_parameter_name(n)] if ".lora_" not in n else torch.ones_like(p)
                   for n, p in lora_llama.named_parameters()}
    assert lora.lora_schedule(lora_llama, peft_fisher, 0.2, 0.0).probabilities() == schedule.probabilities()
    other_rank = lora.wrap(type(tiny_llama.model)(tiny_llama.model.config),
                           lora.parse_lora_spec("r=7,targets=q_proj,v_proj,down_proj"), "CAUSAL_LM")
    sched.apply(other_rank, schedule)
    assert lora.current_probabilities(other_rank) == pytest.approx(schedule.probabilities())


def test_applied_probabilities_act_in_training_and_are_off_in_eval(lora_llama):
    """PEFT's lora_dropout is Identity at p = 0; apply puts a real Dropout there, whose mask changes
    the LoRA branch's output in training mode only."""
    site = "model.layers.0.self_attn.q_proj"
    layer = lora.lora_modules(lora_llama)[site]
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a nonzero LoRA branch
    sched.apply(lora_llama, {site: 0.5})
    assert lora.current_probabilities(lora_llama)[site] == 0.5
    x = torch.ones(4, 32)
    layer.train()
    a, b = layer(x), layer(x)
    branch_a, branch_b = a - layer.get_base_layer()(x), b - layer.get_base_layer()(x)
    assert not torch.allclose(a, b)  # two dropout masks
    seen = []
    hook = layer.lora_dropout["default"].register_forward_hook(lambda m, i, o: seen.append((o == 0).float().mean()))
    layer(torch.ones(64, 32))
    assert 0.35 < float(seen[-1]) < 0.65  # about half the inputs of the LoRA branch are dropped
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    hook.remove()
    assert branch_a.abs().sum() > 0 and branch_b.abs().sum() > 0
    with pytest.raises(UsageError, match="outside"):
        sched.apply(lora_llama, {site: 1.0})
    with pytest.raises(UsageError, match="gaussian|no entry"):
        lora.lora_probabilities(lora_llama, "guided", 0.1, {site: 0.1})


@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory):
    return write_toy_tsv(tmp_path_factory.mktemp("toy") / "toy.tsv", rows=40)


def test_finetune_lora_sweep_saves_adapters_that_peft_loads(toy_tsv, tiny_llama, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from landscape.cli import main
    from landscape.fisher import save_fisher
    from landscape.models import load_model

    save_fisher(tmp_path / "F.safetensors", _fisher(tiny_llama.model), {"model": "tiny"})
    out, saved = tmp_path / "lora.csv", tmp_path / "saved"
    args = ["finetune", "--model", str(tiny_llama_dir), "--dataset", str(toy_tsv), "--lora",
            "r=2,alpha=4,targets=q_proj,v_proj", "--fisher", str(tmp_path / "F.safetensors"), "--restarts", "1",
            "--epochs", "1", "--batch-size", "16", "--seq-len", "16", "--device", "cpu"]
    assert main(args + ["--regularizer", "dropout,guided,gaussian,dropout-matched,guided-shuffled",
                        "--save-models", str(saved), "--out", str(out)]) == 0
    runs = list(csv.DictReader(open(tmp_path / "lora_runs.csv")))
    assert len(runs) == 5 and float(runs[1]["schedule_mean_p"]) == pytest.approx(0.05)
    folder = saved / "guided_f1_s0"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["base_model_name_or_path"] == str(
        tiny_llama_dir)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama_dir), num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert len(lora.lora_modules(loaded)) == 4
    ours = load_model(str(folder))  # --model takes it: a classifier with the adapter's own head
    assert ours.kind == "classification" and ours.adapter["base_model"] == str(tiny_llama_dir)
    ids = torch.tensor([[1, 7, 12, 5]])
    torch.testing.assert_close(ours.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert main(args + ["--regularizer", "dropout,mixout", "--out", str(tmp_path / "x.csv")]) == 2
    assert "mixout mixes trained body weights" in capsys.readouterr().err


@pytest.mark.parametrize("spec, words", [("r=x", "r must be a number"), ("rank=4", "unknown key 'rank'"),
                                         ("r=0", "r must be at least 1"), ("layers=a-b", "layers must be block")])
def test_a_bad_lora_spec_is_refused_in_the_library_s_own_terms(spec, words):
    with pytest.raises(UsageError, match=f"^LoRA spec: {words}") as refused:
        lora.parse_lora_spec(spec)
    assert "--" not in str(refused.value)  # flags are the command line's words, not the library's


def test_without_peft_the_lora_option_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(UsageError, match=r"landscape\[lora\]"):
        lora.require_peft("--lora")


def test_schedule_lora_from_the_base_or_an_adapter_names_the_base_modules(tiny_llama, tiny_llama_dir, tmp_path):
    from landscape.cli import main
    from landscape.fisher import save_fisher

    save_fisher(tmp_path / "F.safetensors", _fisher(tiny_llama.model), {"model": "tiny"})
    assert main(["schedule", str(tmp_path / "F.safetensors"), "--model", str(tiny_llama_dir), "--lora",
                 "r=4,targets=q_proj,v_proj", "--out", str(tmp_path / "s.json")]) == 0
    written = sched.load_schedule(tmp_path / "s.json")
    assert {s.kind for s in written.sites} == {"lora"} and len(written.sites) == 4
    assert min(written.sites, key=lambda s: s.rank).name == "model.layers.0.self_attn.q_proj"
    adapter = lora.wrap(tiny_llama.model, lora.parse_lora_spec("r=1,targets=q_proj,v_proj"), "CAUSAL_LM")
    adapter.save_pretrained(str(tmp_path / "adapter"))
    assert main(["schedule", str(tmp_path / "F.safetensors"), "--model", str(tmp_path / "adapter"), "--lora",
                 "--out", str(tmp_path / "a.json")]) == 0
    assert sched.load_schedule(tmp_path / "a.json").probabilities() == written.probabilities()


def test_each_lora_regularizer_sets_the_lora_dropout_it_names(tiny_llama, lora_llama):
    from landscape.guided import training as ft
    from landscape.guided.regularizers import GaussianDropout

    guided = lora.lora_schedule(lora_llama, _fisher(tiny_llama.model), p_upper=0.3, p_lower=0.0)
    config = ft.FinetuneConfig(dropout=0.15, lora="r=2")
    expected = {"none": {s: 0.0 for s in guided.probabilities()}, "dropout": {s: 0.15 for s in guided.probabilities()},
                "guided": guided.probabilities(), "dropout-matched": sched.matched_uniform(guided).probabilities(),
                "guided-shuffled": sched.shuffled(guided, 3).probabilities()}
    for name, probs in expected.items():
        ft.prepare_regularizer(lora_llama, name, config, guided, seed=3)
        assert lora.current_probabilities(lora_llama) == pytest.approx(probs), name
    ft.prepare_regularizer(lora_llama, "gaussian", config, guided, seed=3)
    slots = [m.lora_dropout["default"] for m in lora.lora_modules(lora_llama).values()]
    assert all(isinstance(s, GaussianDropout) and s.p == 0.15 for s in slots)
    with pytest.raises(UsageError, match="ChildTuning masks"):
        ft.prepare_regularizer(lora_llama, "childtuning", config, guided)
