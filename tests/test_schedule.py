"""Guided dropout schedules: eq. 9-10 exactly, and applied so that they change the run-time dropout."""

import json

import pytest
import torch

from landscape import schedule, schedule_callback
from landscape.errors import UsageError
from landscape.fisher import save_fisher
from landscape.guided.sites import find_sites


def _fisher_with_distinct_site_scores(model):
    """A Fisher whose site scores all differ: parameter k (in named order) is filled with (k+1)^2."""
    return {n: torch.full_like(p, float((k + 1) ** 2)) for k, (n, p) in enumerate(model.named_parameters())}


def test_linear_schedule_is_paper_eq_9_10(tiny_bert):
    model = tiny_bert.model
    fisher = _fisher_with_distinct_site_scores(model)
    s = schedule.guided_dropout(model, fisher, p_upper=0.3, p_lower=0.05)
    n = len(find_sites(model))
    assert len(s.sites) == n
    ordered = sorted(s.sites, key=lambda e: e.rank)
    scores = [e.score for e in ordered]
    assert scores == sorted(scores) and len(set(scores)) == n
    step = (0.3 - 0.05) / (n - 1)
    for e in ordered:
        assert e.p == pytest.approx(0.3 - e.rank * step, abs=1e-12)
    assert ordered[0].p == pytest.approx(0.3) and ordered[-1].p == pytest.approx(0.05)


def test_other_shapes_stay_in_bounds_and_keep_the_order(tiny_bert):
    fisher = _fisher_with_distinct_site_scores(tiny_bert.model)
    for shape in ("log", "power"):
        s = schedule.guided_dropout(tiny_bert.model, fisher, p_upper=0.2, p_lower=0.0, shape=shape)
        ps = [e.p for e in sorted(s.sites, key=lambda e: e.rank)]
        assert ps[0] == pytest.approx(0.2) and ps[-1] == pytest.approx(0.0)
        assert all(a >= b for a, b in zip(ps, ps[1:]))
    power = schedule.power_probabilities(5, 0.1, 0.0, gamma=2.0)
    assert power[2] == pytest.approx(0.1 - 0.1 * 0.25)
    with pytest.raises(UsageError, match="p_lower"):
        schedule.guided_dropout(tiny_bert.model, fisher, p_upper=0.1, p_lower=0.2)


def test_reversed_or_out_of_range_bounds_are_refused_by_every_schedule_function_as_by_the_settings():
    """One check (``checks.dropout_bounds``): the settings and direct calls refuse alike; the
    probability functions once returned a schedule that rose with the Fisher score."""
    from landscape.settings import ScheduleSettings

    reversed_bounds = r"p_lower \(0.2\) must not exceed p_upper \(0.05\)"
    for make in (lambda: schedule.linear_probabilities(4, 0.05, 0.2),
                 lambda: schedule.power_probabilities(4, 0.05, 0.2, gamma=2.0),
                 lambda: schedule.log_probabilities([1.0, 2.0, 4.0], 0.05, 0.2),
                 lambda: ScheduleSettings("F.safetensors", p_upper=0.05, p_lower=0.2)):
        with pytest.raises(UsageError, match=reversed_bounds):
            make()
    with pytest.raises(UsageError, match=r"p_upper must be a number in \[0, 1\), got 1.5"):
        schedule.linear_probabilities(3, 1.5, 0.0)
    assert schedule.linear_probabilities(3, 0.2, 0.0) == pytest.approx([0.2, 0.1, 0.0])


def _bert(path, attn):
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(str(path), attn_implementation=attn)


def _outputs(model, ids, train):
    model.train(train)
    torch.manual_seed(123)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_schedule_takes_effect_under_eager_and_sdpa(tiny_bert_dir, attn):
    model = _bert(tiny_bert_dir, attn)
    assert model.config._attn_implementation == attn
    ids = torch.randint(5, 100, (2, 12))
    # the tiny model's config has dropout 0.1 everywhere: training mode differs from eval before we act
    assert not torch.allclose(_outputs(model, ids, True), _outputs(model, ids, False))
    zeros = {s.name: 0.0 for s in find_sites(model)}
    schedule.apply(model, zeros)
    assert torch.equal(_outputs(model, ids, True), _outputs(model, ids, False))
    one_attention_site = dict(zeros, **{"bert.encoder.layer.1.attention.self.dropout": 0.9})
    schedule.apply(model, one_attention_site)
    assert not torch.allclose(_outputs(model, ids, True), _outputs(model, ids, False))


def _float_attention_models(tiny_t5):
    import transformers as tf

    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=32, attention_dropout=0.1))
    return {"t5": (tiny_t5.model, "encoder.block.1.layer.0.SelfAttention"),
            "llama": (llama, "model.layers.0.self_attn")}


@pytest.mark.parametrize("arch", ["t5", "llama", "gpt2"])
def test_schedule_takes_effect_where_attention_reads_a_float(arch, tiny_t5, tiny_gpt2):
    if arch == "gpt2":
        model, site = tiny_gpt2.model, "transformer.h.0.attn.attn_dropout"
    else:
        model, site = _float_attention_models(tiny_t5)[arch]
    ids = torch.randint(5, 60, (2, 10))

    def run(train):
        model.train(train)
        torch.manual_seed(1)
        extra = {"decoder_input_ids": ids[:, :4]} if arch == "t5" else {}
        with torch.no_grad():
            return model(input_ids=ids, **extra).logits

    zeros = {s.name: 0.0 for s in find_sites(model)}
    schedule.apply(model, zeros)
    assert torch.equal(run(True), run(False))
    schedule.apply(model, dict(zeros, **{site: 0.8}))
    assert schedule.current_probabilities(model)[site] == 0.8
    assert not torch.allclose(run(True), run(False))


def test_a_schedule_for_another_model_is_refused(tiny_bert, tiny_gpt2):
    s = schedule.uniform(tiny_gpt2.model, 0.1)
    before = schedule.current_probabilities(tiny_bert.model)
    with pytest.raises(UsageError, match="does not have"):
        schedule.apply(tiny_bert.model, s)
    assert schedule.current_probabilities(tiny_bert.model) == before  # nothing half-applied


def test_save_load_roundtrip_and_trainer_callback(tiny_bert, tmp_path):
    fisher = _fisher_with_distinct_site_scores(tiny_bert.model)
    s = schedule.guided_dropout(tiny_bert.model, fisher, model_source="m", fisher_source="F.safetensors")
    path = schedule.save_schedule(s, tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["model"] == "m" and data["fisher"] == "F.safetensors"
    assert set(data["sites"][0]) >= {"name", "score", "rank", "p"}
    back = schedule.load_schedule(path)
    assert back.probabilities() == s.probabilities()
    cb = schedule_callback(back)
    cb.on_train_begin(None, None, None, model=tiny_bert.model)
    assert schedule.current_probabilities(tiny_bert.model) == s.probabilities()


def test_cli_writes_schedule_and_refuses_bad_fisher(tiny_bert, tiny_bert_dir, tmp_path, capsys):
    from landscape.cli import main

    fpath = tmp_path / "F.safetensors"
    save_fisher(fpath, _fisher_with_distinct_site_scores(tiny_bert.model), {"model": "tiny"})
    out = tmp_path / "sched.json"
    assert main(["schedule", str(fpath), "--model", str(tiny_bert_dir), "--p-upper", "0.2",
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.dropout" in printed
    data = json.loads(out.read_text())
    assert max(e["p"] for e in data["sites"]) == pytest.approx(0.2)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a fisher")
    out2 = tmp_path / "none.json"
    assert main(["schedule", str(bad), "--model", str(tiny_bert_dir), "--out", str(out2)]) == 2
    assert "error" in capsys.readouterr().err and not out2.exists()
