"""PEFT adapter folders as --model: every stage on the adapted model, --subset adapter, --to from the
base to the adapter, what files record, and the one line without peft."""

import json
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import landscape_cmd, subprocess_env

from landscape.cli import main
from landscape.errors import UsageError
from landscape.models import load_model

peft = pytest.importorskip("peft", reason="peft is the optional extra landscape[lora]")

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 4)


def cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A causal-LM LoRA adapter of the tiny Llama (q_proj, v_proj, rank 2) with nonzero B factors."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                      target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(str(path))
    return path


def test_an_adapter_folder_loads_on_its_base_with_the_adapter_applied(adapter_dir, tiny_llama_dir):
    loaded = load_model(str(adapter_dir))
    assert loaded.kind == "causal" and loaded.source == str(adapter_dir.resolve())
    assert loaded.adapter["base_model"] == str(tiny_llama_dir) and len(loaded.adapter["adapter_config_sha256"]) == 64
    assert all(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    base = load_model(str(tiny_llama_dir))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    expected = peft.PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()(input_ids=ids).logits
    plain = load_model(str(tiny_llama_dir)).model(input_ids=ids).logits
    got = loaded.model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, plain, atol=1e-3)


def test_a_bfloat16_adapter_keeps_its_bases_rotary_frequencies_in_float32(adapter_dir):
    # The adapter's cast is the load's: Module.to(bfloat16) alone would round them (docs/curvature.md, Memory).
    half, full = load_model(str(adapter_dir), dtype="bfloat16").model, load_model(str(adapter_dir)).model
    rotary = {n: b for n, b in half.named_buffers() if "rotary" in n}
    assert rotary and all(b.dtype == torch.float32 and torch.equal(b, full.get_buffer(n)) for n, b in rotary.items())
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_without_peft_an_adapter_folder_is_one_line_naming_the_extra(adapter_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UsageError, match=r"landscape\[lora\]"):
        load_model(str(adapter_dir))
    assert cli("fisher", "--model", adapter_dir, "--out", "never.safetensors") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "landscape[lora]" in err[0]


def test_every_stage_runs_on_an_adapter_and_files_record_it(adapter_dir, tiny_corpus_file, tmp_path):
    from landscape.direction_file import load_directions
    from landscape.fisher import load_fisher
    from landscape.surface.file import read_surface

    fisher, meta = load_fisher(cli_ok("fisher", "--model", adapter_dir, "--corpus", tiny_corpus_file, *SAMPLE,
                                      "--quiet", "--out", tmp_path / "F.safetensors"))
    assert meta["adapter"] == str(adapter_dir.resolve()) and meta["base_model"] and meta["adapter_config_sha256"]
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert fisher[lora_a].sum() > 0 and "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in fisher
    # --subset adapter: only the LoRA factors move (the adapter has no saved head; 1-D tensors ignored)
    dirs, attrs = load_directions(cli_ok("directions", "--model", adapter_dir, "--subset", "adapter",
                                         "--out", tmp_path / "D.h5"))
    moved = {n for n, t in dirs[0].items() if t.any()}
    assert moved and all(".lora_" in n for n in moved) and lora_a in moved
    assert attrs["subset"] == "adapter" and attrs["adapter"] == str(adapter_dir.resolve())
    assert attrs["n_selected"] == sum(dirs[0][n].numel() for n in dirs[0] if ".lora_" in n)
    surface = cli_ok("surface", "--model", adapter_dir, "--directions", tmp_path / "D.h5", "--corpus",
                     tiny_corpus_file, *SAMPLE, "--x", "-1:1:3", "--y", "-1:1:3", "--out", tmp_path / "S.h5")
    loss = read_surface(surface).z
    assert np.isfinite(loss).all() and loss.shape == (3, 3)
    with h5py.File(surface, "r") as handle:
        assert handle.attrs["adapter"] == str(adapter_dir.resolve())
    report = json.loads(cli_ok("hessian", "--model", adapter_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--top", 1,
                               "--quiet", "--out", tmp_path / "H.json").read_text())
    assert np.isfinite(report["eigenvalues"][0])
    assert json.dumps(report).count(str(adapter_dir.resolve())) >= 1


def cli_ok(*args):
    assert cli(*args) == 0
    return args[-1]


@pytest.mark.slow
def test_hessian_over_the_adapter_is_the_dense_hessian_of_its_factors(adapter_dir, tiny_corpus_file, tmp_path):
    """``hessian --subset adapter``: the curvature of the low-rank subspace where fine-tuning moved.
    Its top eigenvalue is that of the dense Hessian of the loss in the LoRA factors alone (built
    here from one double backward per coordinate, in float64)."""
    from landscape.curvature.operator import _use_eager_attention
    from landscape.data.corpus import load_batches
    from landscape.data.objectives import sequence_losses
    from landscape.testing.dense import dense_hessian_of

    report = json.loads(cli_ok("hessian", "--model", adapter_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--subset",
                               "adapter", "--top", 1, "--tol", 1e-6, "--quiet", "--out", tmp_path / "H.json")
                        .read_text())
    loaded = load_model(str(adapter_dir))
    model = loaded.model.double().eval()
    _use_eager_attention(model)  # sdpa has no double backward
    batches = load_batches(loaded, corpus=tiny_corpus_file, max_samples=4, seq_len=16, batch_size=4)
    factors = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert report["settings"]["subset"] == "adapter" and sum(p.numel() for p in factors) == 448
    parts = [sequence_losses(model, b, loaded.kind) for b in batches]
    loss = sum(s.loss_sum.sum() for s in parts) / sum(s.n_tokens.sum() for s in parts)
    top = float(torch.linalg.eigvalsh(dense_hessian_of(loss, factors)).abs().max())
    assert report["eigenvalues"][0] == pytest.approx(top, rel=1e-4)
    assert cli("hessian", "--model", adapter_dir, "--subset", "adapter", "--fisher", tmp_path / "H.json",
               "--out", tmp_path / "H2.json") == 2


@pytest.mark.distributed
def test_two_ranks_sharding_an_adapter_give_the_single_process_fisher_and_surface(adapter_dir, tiny_corpus_file,
                                                                                   tmp_path):
    """FSDP2 shards the adapted model (base and LoRA factors) as it shards a plain one: the same
    Fisher and the same surface over the adapter's subspace as one process."""
    import subprocess

    from landscape.fisher import load_fisher
    from landscape.surface.file import read_surface

    def both(command, *args):
        suffix = ".safetensors" if command == "fisher" else ".h5"
        single = cli_ok(command, *args, "--out", tmp_path / f"one_{command}{suffix}")
        sharded = tmp_path / f"two_{command}{suffix}"
        done = subprocess.run(landscape_cmd(command, *args, "--shard-size", "2", "--out", sharded, ranks=2),
                              capture_output=True, text=True, timeout=300, env=subprocess_env())
        assert done.returncode == 0, done.stderr
        return single, sharded

    common = ("--model", adapter_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--device", "cpu")
    one, two = both("fisher", *common, "--quiet")
    (single, meta), (sharded, sharded_meta) = load_fisher(one), load_fisher(two)
    assert sharded_meta["adapter"] == meta["adapter"] and sharded_meta["shard_size"] == "2"
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-12)
    cli_ok("directions", "--model", adapter_dir, "--subset", "adapter", "--out", tmp_path / "D.h5")
    one, two = both("surface", *common, "--directions", tmp_path / "D.h5", "--x", "-1:1:3", "--y", "-1:1:3")
    np.testing.assert_allclose(read_surface(two).z, read_surface(one).z, rtol=1e-6)


def test_directions_to_an_adapter_are_its_merged_update(adapter_dir, tiny_llama_dir, tmp_path, capsys):
    from landscape.direction_file import load_directions

    cli_ok("directions", "--model", tiny_llama_dir, "--to", adapter_dir, "--out", tmp_path / "T.h5")
    dirs, attrs = load_directions(tmp_path / "T.h5")
    adapted = load_model(str(adapter_dir)).model
    layer = adapted.base_model.model.model.layers[1].self_attn.v_proj
    update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(dirs[0]["model.layers.1.self_attn.v_proj.weight"], update, atol=1e-6, rtol=1e-5)
    assert not dirs[0]["model.layers.1.mlp.up_proj.weight"].any()  # not adapted: no move
    assert attrs["to_adapter"] == str(adapter_dir.resolve()) and attrs["model"] == str(tiny_llama_dir)
    assert cli("directions", "--model", adapter_dir, "--to", tiny_llama_dir, "--out", tmp_path / "R.h5") == 2
    assert "give the plain model (the base) as --model" in capsys.readouterr().err
    assert cli("directions", "--model", tiny_llama_dir, "--subset", "adapter", "--out", tmp_path / "N.h5") == 2
    assert "needs a PEFT adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_adapter_loads_and_its_guided_lora_schedule_serves_another_rank(tmp_path):
    """On the real SmolLM2-135M-Instruct (skipped where it is not built): a LoRA adapter folder loads
    through --model's loader with the adapter applied, and a schedule made on rank 8 sets rank 2."""
    from real_checkpoints import SMOLLM2, real_checkpoint
    from transformers import AutoModelForCausalLM

    from landscape.guided import lora
    from landscape.guided import schedule as sched

    folder = real_checkpoint(SMOLLM2)
    spec = lora.parse_lora_spec("r=8,alpha=16,targets=q_proj,v_proj,layers=28-29")
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(str(folder)), spec, "CAUSAL_LM")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_model(str(tmp_path / "adapter"))
    ids = loaded.tokenizer("A quiet, moving film.", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert loaded.adapter["base_model"] == str(folder) and loaded.kind == "causal"
    fisher = {lora.base_parameter_name(n): torch.full_like(p, 1.0 + i) for i, (n, p) in
              enumerate(model.named_parameters()) if ".lora_" not in n}
    schedule = lora.lora_schedule(loaded.model, fisher)
    assert [s.name for s in sorted(schedule.sites, key=lambda s: s.rank)] == [
        "model.layers.28.self_attn.q_proj", "model.layers.28.self_attn.v_proj",
        "model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.v_proj"]
    other = lora.wrap(AutoModelForCausalLM.from_pretrained(str(folder)),
                      dict(spec, r=2, alpha=4.0), "CAUSAL_LM")
    sched.apply(other, schedule)
    assert lora.current_probabilities(other) == pytest.approx(schedule.probabilities())


def test_the_embedded_base_is_found_by_name_and_a_moved_install(tmp_path, tiny_llama_dir):
    from landscape.adapters import resolve_base
    from landscape.datahome import EMBEDDED_MODEL_DIR

    assert resolve_base({"base_model_name_or_path": str(EMBEDDED_MODEL_DIR)}, tmp_path) is None
    assert resolve_base({"base_model_name_or_path": "/old/site-packages/landscape/data/model"}, tmp_path) is None
    assert resolve_base({"base_model_name_or_path": "embedded"}, tmp_path) is None
    assert resolve_base({"base_model_name_or_path": str(tiny_llama_dir)}, tmp_path) == str(tiny_llama_dir)
    assert resolve_base({"base_model_name_or_path": "org/some-model"}, tmp_path) == "org/some-model"
    with pytest.raises(UsageError, match="does not say its base model"):
        resolve_base({}, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(UsageError, match="safetensors only"):
        load_model(str(tmp_path))


def test_a_bert_lora_classifier_saves_its_new_pooler_and_head_and_loads_back(tiny_bert_dir, tmp_path):
    """A masked-LM checkpoint has no pooler: the classifier's pooler is new, so it trains and is saved
    with the adapter; --model DIR then rebuilds exactly the trained classifier."""
    from conftest import write_toy_tsv
    from transformers import AutoModelForSequenceClassification

    data = write_toy_tsv(tmp_path / "toy.tsv", rows=20)
    assert cli("finetune", "--model", tiny_bert_dir, "--dataset", data, "--lora", "r=2,targets=query,value",
               "--regularizer", "dropout", "--restarts", 1, "--epochs", 1, "--batch-size", 8, "--seq-len", 16,
               "--device", "cpu", "--save-models", tmp_path / "saved", "--out", tmp_path / "r.csv") == 0
    folder = tmp_path / "saved" / "dropout_f1_s0"
    ours = load_model(str(folder))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.tensor([[2, 17, 30, 3]])
    torch.testing.assert_close(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert any("pooler" in n for n in json.loads((folder / "adapter_config.json").read_text())["modules_to_save"])


def test_a_three_class_lora_adapter_loads_with_three_labels(tiny_llama_dir, tmp_path):
    rows = ["text\tlabel"] + [f"{w} film number {i}\t{w}" for i in range(8) for w in ("good", "bad", "odd")]
    (tmp_path / "three.tsv").write_text("\n".join(rows) + "\n")
    assert cli("finetune", "--model", tiny_llama_dir, "--dataset", tmp_path / "three.tsv", "--lora", "r=2",
               "--regularizer", "none", "--restarts", 1, "--epochs", 1, "--batch-size", 8, "--seq-len", 16,
               "--device", "cpu", "--save-models", tmp_path / "saved", "--out", tmp_path / "r.csv") == 0
    loaded = load_model(str(tmp_path / "saved" / "none_f1_s0"))
    assert loaded.kind == "classification" and loaded.model(input_ids=torch.tensor([[1, 4, 6]])).logits.shape == (1, 3)


def test_an_adapter_with_a_nan_factor_is_refused_in_one_line(adapter_dir, tiny_corpus_file, tmp_path, capsys):
    """The base's weights are checked when it loads; the adapter's own factors are checked too."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    next(t for n, t in sorted(weights.items()) if "lora_A" in n)[0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    for command, out in (("fisher", "F.safetensors"), ("hessian", "H.json")):
        capsys.readouterr()
        assert cli(command, "--model", broken, "--corpus", tiny_corpus_file, *SAMPLE, "--quiet",
                   "--out", tmp_path / out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "non-finite weights" in err[0] and "lora_A" in err[0]
        assert not (tmp_path / out).exists()
