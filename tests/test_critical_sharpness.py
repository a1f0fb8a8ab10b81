"""Critical sharpness (issue 29, items 3-5): the line search, the stage, the command and a sweep.

The independent numbers: a float64 model whose loss is exactly quadratic in the parameters that
move (a regression head on a frozen body: the squared error of a linear function), where λ_c along
−g must equal gᵀHg/gᵀg with H from ``torch.autograd.functional.hessian``; and the loss at
η_c·(1 ± tolerance), read by the surface stage along the ``vectors`` file, on each side of the
origin's.
"""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_in_process, one_line

from landscape.critical import line_loss, loss_gradient, rayleigh_quotient, run_critical_sharpness, step_direction
from landscape.curvature.critical import MAX_PASSES, critical_step
from landscape.direction_file import load_directions, save_directions
from landscape.errors import SettingsMismatch, SettingsRefused, UsageError
from landscape.models import LoadedModel
from landscape.settings import CriticalSharpnessSettings, GridSpec, ModelSpec, SampleSpec, SurfaceSettings

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("critical_lr", "critical_sharpness", "loss_at_origin", "forward_passes", "tolerance", "direction",
        "model_fingerprint", "sample_fingerprint")


# ----------------------------------------------------------------------------- the line search alone
@pytest.mark.parametrize("start", [1e-4, 0.05, 1.0, 30.0])
@pytest.mark.parametrize("known_slope", [True, False])
def test_the_search_finds_the_quadratic_step_within_the_tolerance(start, known_slope):
    a, b, tol = 2.0, 5.0, 0.05  # L = 3 - aη + bη²/2: back at 3 at η = 2a/b
    calls = []

    def loss_at(eta):
        calls.append(eta)
        return 3.0 - a * eta + 0.5 * b * eta * eta

    found = critical_step(loss_at, start=start, tolerance=tol, slope=-a if known_slope else None)
    exact = 2 * a / b
    assert found.converged and abs(found.critical_lr / exact - 1) <= tol
    assert loss_at(found.critical_lr * (1 - tol)) <= 3.0 < loss_at(found.critical_lr * (1 + tol))
    assert found.forward_passes == len(calls) - 2 <= MAX_PASSES  # the two checks above are not the search's
    assert found.critical_sharpness == pytest.approx(2 / found.critical_lr)


def test_a_direction_along_which_the_loss_rises_is_refused_not_flipped():
    with pytest.raises(UsageError, match="rises at once.*not a descent direction"):
        critical_step(lambda eta: 3.0 + eta + eta * eta, start=1.0)
    with pytest.raises(UsageError, match="slope at the origin is 0.5.*not a descent direction"):
        critical_step(lambda eta: 3.0, start=1.0, slope=0.5)
    with pytest.raises(UsageError, match="did not rise back"):
        critical_step(lambda eta: 3.0 - eta, start=1.0)


def test_a_search_out_of_passes_says_how_close_it_came():
    found = critical_step(lambda eta: 3.0 - eta + eta ** 4, start=1e-3, tolerance=0.01, max_passes=5)
    assert not found.converged and found.reached > 0.01 and found.forward_passes == 5
    assert found.lower < found.critical_lr < found.upper
    assert found.reached == pytest.approx((found.upper - found.lower) / (found.upper + found.lower))


# ----------------------------------------------------------------------------- a quadratic model
def _regression(tiny_bert_dir):
    """A float64 regression head on the tiny BERT's frozen body: the loss is quadratic in the head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from landscape.runtime import transformers_silenced

    torch.manual_seed(0)
    with transformers_silenced():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=1)
    model = model.double().eval()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["the cat sat on the mat", "a dog ran in the park today", "rain fell all night", "we read a book"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    return LoadedModel(model, tokenizer, "classification", str(tiny_bert_dir)), [batch]


def test_along_minus_g_a_quadratic_loss_has_the_rayleigh_quotient_of_g(tiny_bert_dir, tmp_path):
    from torch.func import functional_call

    loaded, batches = _regression(tiny_bert_dir)
    gradient, _ = loss_gradient(loaded.model, batches, loaded.kind)
    direction, slope = step_direction(gradient, "gradient")
    tol = 0.05
    found = critical_step(line_loss(loaded, direction, batches), start=1e-3, tolerance=tol, slope=slope)

    names = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    shapes = [loaded.model.get_parameter(n).shape for n in names]
    flat = torch.cat([loaded.model.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[offset: offset + shape.numel()].view(shape)
            offset += shape.numel()
        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        out = functional_call(loaded.model, params, (), inputs).logits[:, 0]
        return ((out - batches[0]["labels"]) ** 2).mean()

    H = torch.autograd.functional.hessian(loss, flat)
    g = torch.autograd.functional.jacobian(loss, flat)
    assert torch.allclose(g, torch.cat([gradient[n].double().reshape(-1) for n in names]), rtol=1e-5, atol=1e-9)
    exact = float(g @ H @ g / (g @ g))
    assert found.converged and abs(found.critical_sharpness / exact - 1) <= tol, (found, exact)
    assert rayleigh_quotient(loaded, direction, batches) == pytest.approx(exact, rel=1e-5)

    # The bracket, measured by the surfaces' evaluator along the direction as a file holds it.
    save_directions(tmp_path / "d.h5", [{n: t.float() for n, t in direction.items()}])
    along, _ = load_directions(tmp_path / "d.h5", loaded.model, dtype=torch.float64)
    from landscape.surface import evaluate

    low, origin, high = evaluate(loaded.model, along, batches, [found.critical_lr * (1 - tol), 0.0,
                                                                found.critical_lr * (1 + tol)], kind=loaded.kind)
    assert low <= origin < high


# ----------------------------------------------------------------------------- the stage and the command
def _settings(model_dir, corpus, **changes):
    return CriticalSharpnessSettings(model=ModelSpec(str(model_dir)), sample=SampleSpec(corpus=str(corpus),
                                                                                          max_samples=4, seq_len=16,
                                                                                          batch_size=4), **changes)


def _surface_loss(tmp_path, name, vectors, model_dir, corpus, xs):
    from landscape.surface import read_surface, run_surface

    grid = GridSpec(x=f"{xs[0]!r}:{xs[1]!r}:3")
    settings = SurfaceSettings(str(vectors), ModelSpec(str(model_dir)), SampleSpec(corpus=str(corpus), max_samples=4,
                                                                                    seq_len=16, batch_size=4), grid)
    run_surface(settings, out=tmp_path / f"{name}.h5", progress=False)
    return read_surface(tmp_path / f"{name}.h5").z


def test_the_report_its_resume_and_the_line_surface_draws(tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    settings = _settings(tiny_gpt2_dir, tiny_corpus_file, rayleigh=True)
    out, vectors = tmp_path / "R.json", tmp_path / "D.h5"
    first = run_critical_sharpness(settings, out=out, vectors=vectors)
    report = json.loads(out.read_text())
    assert first.computed == 1 and all(key in report for key in KEYS)
    assert report["critical_sharpness"] == pytest.approx(2 / report["critical_lr"])
    assert report["forward_passes"] <= MAX_PASSES and report["converged"] and report["tolerance"] == 0.05
    assert report["direction"]["kind"] == "gradient" and math.isfinite(report["rayleigh_quotient"])
    assert first.fingerprints["model_fingerprint"] == report["model_fingerprint"]

    # The surface stage along the written direction: the origin's loss, and the bracket around η_c.
    eta, tol = report["critical_lr"], report["tolerance"]
    far = _surface_loss(tmp_path, "far", vectors, tiny_gpt2_dir, tiny_corpus_file, (-eta * (1 + tol), eta * (1 + tol)))
    near = _surface_loss(tmp_path, "near", vectors, tiny_gpt2_dir, tiny_corpus_file,
                         (-eta * (1 - tol), eta * (1 - tol)))
    assert far[1] == pytest.approx(report["loss_at_origin"], rel=1e-6)
    assert near[2] <= report["loss_at_origin"] < far[2]

    again = run_critical_sharpness(settings, out=out, vectors=vectors)
    assert again.computed == 0 and again.report == report
    with pytest.raises(SettingsMismatch, match="tolerance=0.05, this run has tolerance=0.04"):
        run_critical_sharpness(settings.replace(tolerance=0.04), out=out)
    redone = run_critical_sharpness(settings.replace(tolerance=0.04), out=out, overwrite=True)
    assert redone.computed == 1 and redone.report["tolerance"] == 0.04


def test_a_finished_report_is_compared_as_every_recorded_identity(tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    """A rerun reads the report back through ``identity.refuse_changed``: a version-1 fingerprint of the
    same model reads; a changed sample is named first, with the setting that changed its tokens; every
    other setting that differs is named (each once failed: a v1 report was refused, one key named)."""
    from landscape import identity
    from landscape.files import json_text

    settings, out = _settings(tiny_gpt2_dir, tiny_corpus_file), tmp_path / "R.json"
    run_critical_sharpness(settings, out=out)
    report = json.loads(out.read_text())
    report["settings"][identity.MODEL_KEY] = identity._source_fingerprint_v1(tiny_gpt2_dir)
    out.write_text(json_text(report))
    assert run_critical_sharpness(settings, out=out).computed == 0
    with pytest.raises(SettingsMismatch) as refused:
        run_critical_sharpness(settings.replace(tolerance=0.04, rayleigh=True), out=out)
    assert ("critical-sharpness report made with other settings (rayleigh=False, this run has rayleigh=True; "
            "tolerance=0.05, this run has tolerance=0.04)") in str(refused.value)
    with pytest.raises(SettingsMismatch, match=r"report made with other settings: the sample changed .*seq_len was "
                                               r"16, now 8") as refused:
        run_critical_sharpness(settings.replace(seq_len=8, tolerance=0.04), out=out)
    assert "tolerance" not in str(refused.value)


def test_sign_and_relative_directions_record_what_they_walked(tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    task = tmp_path / "task.txt"
    task.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    sign = run_critical_sharpness(_settings(tiny_gpt2_dir, tiny_corpus_file, direction="sign"), out=tmp_path / "s.json")
    assert sign.report["direction"]["kind"] == "sign" and "sign" in sign.report["direction"]["description"]
    relative = run_critical_sharpness(_settings(tiny_gpt2_dir, tiny_corpus_file, update_corpus=str(task)),
                                      out=tmp_path / "r.json")
    plain = run_critical_sharpness(_settings(tiny_gpt2_dir, tiny_corpus_file), out=tmp_path / "p.json")
    assert relative.report["direction"]["relative"] and "update_sample_fingerprint" in relative.report["settings"]
    assert relative.report["loss_at_origin"] == plain.report["loss_at_origin"]  # the same loss, another update
    assert relative.report["critical_lr"] != plain.report["critical_lr"]


def test_bad_directions_are_refused_in_one_line(tiny_gpt2_dir, tiny_corpus_file, tmp_path, capfd):
    common = ["critical-sharpness", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, "--max-samples", "4",
              "--seq-len", "16", "--threads", "1", "--quiet"]
    code, _, err = cli_in_process(capfd, *common, "--out", tmp_path / "R.json", "--vectors", tmp_path / "D.h5")
    assert code == 0, err
    ascent, _ = load_directions(tmp_path / "D.h5")
    save_directions(tmp_path / "up.h5", [{n: -t for n, t in ascent[0].items()}])
    code, _, err = cli_in_process(capfd, *common, "--direction", tmp_path / "up.h5", "--out", tmp_path / "U.json")
    one_line(code, err, "rises at once", "not a descent direction")
    assert not (tmp_path / "U.json").exists()

    (tmp_path / "junk.h5").write_text("not hdf5")
    code, _, err = cli_in_process(capfd, *common, "--direction", tmp_path / "junk.h5", "--out", tmp_path / "J.json")
    one_line(code, err, "junk.h5", "not a direction file")
    code, _, err = cli_in_process(capfd, *common, "--direction", "upward", "--out", tmp_path / "J.json")
    one_line(code, err, "gradient, sign or a direction file")
    code, _, err = cli_in_process(capfd, *common, "--tolerance", "0.2", "--out", tmp_path / "J.json")
    one_line(code, err, "--tolerance")
    code, _, err = cli_in_process(capfd, *common, "--shard-size", "2", "--out", tmp_path / "J.json")
    one_line(code, err, "shard size of 2 needs 2", "under torchrun")  # one process cannot be a group of 2
    # The sharded quotient takes hessian's rules: the gradient-only product, of a float32 model.
    code, _, err = cli_in_process(capfd, *common, "--rayleigh", "--shard-size", "2", "--out", tmp_path / "J.json")
    one_line(code, err, "--shard-size > 1 needs the gradient-only product (--hvp difference)")
    code, _, err = cli_in_process(capfd, *common, "--rayleigh", "--hvp", "difference", "--dtype", "bfloat16",
                                  "--shard-size", "2", "--out", tmp_path / "J.json")
    one_line(code, err, "--shard-size > 1 needs --dtype float32, not bfloat16")
    assert not (tmp_path / "J.json").exists()
    assert _settings(tiny_gpt2_dir, tiny_corpus_file).replace(shard_size=2).model.shard_size == 2
    with pytest.raises(SettingsRefused, match=r"shard_size > 1 needs the gradient-only product \(hvp difference\)"):
        _settings(tiny_gpt2_dir, tiny_corpus_file, rayleigh=True).replace(shard_size=2)
    sharded = _settings(tiny_gpt2_dir, tiny_corpus_file, rayleigh=True, hvp="difference").replace(shard_size=2)
    assert sharded.rayleigh and sharded.model.shard_size == 2  # what a sharded quotient takes
    with pytest.raises(UsageError, match="update_corpus gives a gradient direction"):
        _settings(tiny_gpt2_dir, tiny_corpus_file, direction=str(tmp_path / "up.h5"), update_corpus="x.txt")
    code, _, err = cli_in_process(capfd, *common, "--out", tmp_path / "R.json", "--max-samples", "3")
    one_line(code, err, "other settings", "--overwrite")


def test_a_bfloat16_model_and_a_peft_adapter(tiny_llama_dir, tiny_corpus_file, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    result = run_critical_sharpness(_settings(tmp_path / "adapter", tiny_corpus_file), out=tmp_path / "a.json",
                                    vectors=tmp_path / "a.h5")
    with h5py.File(tmp_path / "a.h5") as handle:  # only the adapter's factors move
        moved = [name for name, data in handle["xdirection"].items() if np.any(data[()])]
    assert moved and all("lora_" in name for name in moved)
    assert result.report["converged"] and result.report["settings"].get("adapter")

    half = run_critical_sharpness(_settings(tiny_llama_dir, tiny_corpus_file).replace(dtype="bfloat16"),
                                  out=tmp_path / "b.json")
    assert half.report["settings"]["dtype"] == "bfloat16" and half.report["critical_sharpness"] > 0


@pytest.mark.slow
def test_a_sweep_over_a_folder_of_checkpoints_writes_a_table_and_a_figure(tiny_gpt2_dir, tiny_corpus_file, tmp_path,
                                                                         capfd):
    import shutil

    for step in (10, 2):
        shutil.copytree(tiny_gpt2_dir, tmp_path / "run" / f"checkpoint-{step}")
    code, out, err = cli_in_process(capfd, "critical-sharpness", "--model", tmp_path / "run", "--corpus",
                                    tiny_corpus_file, "--update-corpus", tiny_corpus_file, "--max-samples", "4",
                                    "--seq-len", "16", "--threads", "1", "--quiet", "--out", tmp_path / "S.csv")
    assert code == 0, err
    lines = (tmp_path / "S.csv").read_text().splitlines()
    assert lines[0].startswith("checkpoint,critical_lr,critical_sharpness") and len(lines) == 3
    assert lines[1].startswith(str(tmp_path / "run" / "checkpoint-2"))  # natural order
    assert (tmp_path / "S.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- sharded under torchrun
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_bert"])
def test_a_sharded_run_equals_the_single_process(name, request, tiny_corpus_file, tmp_path):
    """``--shard-size 2`` on 2 gloo ranks: the numbers and the direction file of one process.

    Tolerance 1e-6 relative: the sharded gradient is FSDP2's reduce-scatter (the mean over 2 ranks
    of the same per-rank gradient, exact in binary) of a backward through gathered weights, and its
    forward passes run the same weights, so the losses agree to float32 rounding of sums over the
    sample (measured here: loss_at_origin equal, critical_lr within 4.4e-16 relative, one ulp of
    the float64 arithmetic of the search's steps).  The search walks the same steps as long as its
    comparisons of losses are not within that rounding of a tie, so η_c, a midpoint of two of its
    steps, then agrees to rounding too; 1e-6 leaves room for another summation order (other
    thread counts), and a wrong gradient (one rank's rows only, a sum where the mean belongs)
    moves the first step, and η_c, by O(1).
    """
    import subprocess

    from conftest import landscape_cmd, subprocess_env

    model_dir = request.getfixturevalue(name + "_dir")
    common = ["critical-sharpness", "--model", model_dir, "--corpus", tiny_corpus_file, "--max-samples", "4",
              "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet"]
    one = subprocess.run(landscape_cmd(*common, "--out", tmp_path / "one.json", "--vectors", tmp_path / "one.h5"),
                         capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert one.returncode == 0, one.stderr
    two = subprocess.run(landscape_cmd(*common, "--shard-size", "2", "--out", tmp_path / "two.json", "--vectors",
                                       tmp_path / "two.h5", ranks=2),
                         capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert two.returncode == 0, two.stderr
    single, sharded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for key in ("critical_lr", "critical_sharpness", "loss_at_origin"):
        assert sharded[key] == pytest.approx(single[key], rel=1e-6, abs=0), key
    assert sharded["forward_passes"] == single["forward_passes"] and sharded["converged"] == single["converged"]
    assert sharded["settings"] == single["settings"]  # the same identity: the shard size is how, not what
    (whole,), _ = load_directions(tmp_path / "one.h5")
    (gathered,), _ = load_directions(tmp_path / "two.h5")
    assert sorted(whole) == sorted(gathered)
    scale = max(float(t.abs().max()) for t in whole.values())
    for key, values in whole.items():  # every row gathered in its place, none left zero or doubled
        assert torch.allclose(gathered[key], values, rtol=1e-4, atol=1e-6 * scale), key


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_a_sharded_rayleigh_quotient_equals_the_single_process(name, request, tiny_corpus_file, tmp_path):
    """``--rayleigh --hvp difference --shard-size 2`` on 2 gloo ranks: the single process's dᵀHd/dᵀd.

    Tolerance 1e-5 relative: d agrees with one process's to float32 rounding (the test above), a
    single sharded difference product equals one process's to rounding (docs/curvature.md,
    "Sharded"), and the sums over the shard group add the ranks' float64 partial sums in another
    order (measured: 3.2e-16 on GPT-2, 2.0e-15 on Llama).  A sum left to one rank's rows would give
    that rank's own quotient, or half of dᵀd against the whole dᵀHd: another number, not rounding.
    """
    import subprocess

    from conftest import landscape_cmd, subprocess_env

    common = ["critical-sharpness", "--model", request.getfixturevalue(name + "_dir"), "--corpus", tiny_corpus_file,
              "--max-samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet",
              "--rayleigh", "--hvp", "difference"]
    reports = {}
    for ranks, extra in ((1, []), (2, ["--shard-size", "2"])):
        out = tmp_path / f"R{ranks}.json"
        done = subprocess.run(landscape_cmd(*common, *extra, "--out", out, ranks=ranks), capture_output=True,
                              text=True, timeout=300, env=subprocess_env())
        assert done.returncode == 0, done.stderr[-3000:]
        reports[ranks] = json.loads(out.read_text())
    single, sharded = reports[1], reports[2]
    assert math.isfinite(single["rayleigh_quotient"]) and single["rayleigh_quotient"] != 0
    assert sharded["rayleigh_quotient"] == pytest.approx(single["rayleigh_quotient"], rel=1e-5, abs=0)
    assert sharded["hessian_vector_products"] == 1
    for key in ("critical_lr", "loss_at_origin"):  # the quotient leaves the search as it was
        assert sharded[key] == pytest.approx(single[key], rel=1e-6, abs=0), key
    assert sharded["settings"] == single["settings"]  # hvp recorded in both; the shard size is how, not what


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_the_checkpoints_it_measured(tiny_gpt2_dir, tiny_corpus_file, tmp_path, capfd,
                                                               monkeypatch):
    """Counted by the models the sweep prepares: a rerun measures only what the interrupted run had not."""
    import shutil

    from landscape import critical_sweep

    run = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(tiny_gpt2_dir, run / f"checkpoint-{step}")
    weights = next(p.name for p in (run / "checkpoint-3").iterdir() if p.suffix in (".safetensors", ".bin"))
    (run / "checkpoint-3" / weights).write_bytes(b"not weights")  # the sweep stops there, after two rows
    prepared = []
    real = critical_sweep.prepare
    monkeypatch.setattr(critical_sweep, "prepare",
                        lambda s, *a, **k: prepared.append(s.model.source) or real(s, *a, **k))
    settings = _settings(tiny_gpt2_dir, tiny_corpus_file)
    checkpoints = critical_sweep.checkpoints_of([run])
    out = tmp_path / "S.csv"
    with pytest.raises(UsageError, match="checkpoint-3.*cannot be read"):
        critical_sweep.run_critical_sweep(settings, checkpoints, out=out)
    assert len(prepared) == 3 and not out.exists()

    common = ["critical-sharpness", "--model", run, "--corpus", tiny_corpus_file, "--max-samples", "4", "--seq-len",
              "16", "--batch-size", "4", "--threads", "1", "--quiet", "--out", out]
    code, _, err = cli_in_process(capfd, *common, "--tolerance", "0.04")  # other settings: refused, nothing measured
    one_line(code, err, "S.csv.journal", "other settings", "tolerance 0.05 then, 0.04 now", "--overwrite")
    assert len(prepared) == 3

    shutil.copy(tiny_gpt2_dir / weights, run / "checkpoint-3" / weights)
    prepared.clear()
    resumed = critical_sweep.run_critical_sweep(settings, checkpoints, out=out)
    assert prepared == [str(run / "checkpoint-3")] and (resumed.computed, resumed.total) == (3 - 2, 3)
    fresh = critical_sweep.run_critical_sweep(settings, checkpoints, out=tmp_path / "F.csv")
    assert out.read_text() == (tmp_path / "F.csv").read_text()  # the journaled rows, exactly as measured

    prepared.clear()
    again = critical_sweep.run_critical_sweep(settings, checkpoints, out=out)  # complete: nothing measured
    assert prepared == [] and again.rows == fresh.rows
    code, _, err = cli_in_process(capfd, *common, "--overwrite")  # starts afresh
    assert code == 0, err
    assert len(prepared) == 3

    torch.manual_seed(5)  # new weights in a checkpoint already measured: its row no longer stands
    from transformers import AutoModelForCausalLM

    changed = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(run / "checkpoint-1")
    with pytest.raises(SettingsMismatch, match="checkpoint-1' changed since it was measured"):
        critical_sweep.run_critical_sweep(settings, checkpoints, out=out)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_sweep_and_a_sharded_adapter(tiny_gpt2_dir, tiny_llama_dir, tiny_corpus_file, tmp_path):
    """A sweep on 2 gloo ranks with --shard-size 2 writes the single process's table (the same 1e-6 as above).

    One checkpoint is a PEFT adapter (only its factors move), and the second model sharded in one
    process is what ``sharding.check_uniform`` once refused (equal meshes that are not one object).
    """
    import csv
    import shutil
    import subprocess

    from conftest import landscape_cmd, subprocess_env

    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                             LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "run" / "checkpoint-2")
    shutil.copytree(tiny_gpt2_dir, tmp_path / "run" / "checkpoint-1")
    # The sign step (its slope, a sum of |g| over the group's rows) and the update loss's own search too.
    common = ["critical-sharpness", "--model", tmp_path / "run", "--corpus", tiny_corpus_file, "--max-samples", "4",
              "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet", "--direction", "sign",
              "--update-corpus", tiny_corpus_file]
    tables = {}
    for ranks, extra in ((1, []), (2, ["--shard-size", "2"])):
        out = tmp_path / f"S{ranks}.csv"
        done = subprocess.run(landscape_cmd(*common, *extra, "--out", out, ranks=ranks), capture_output=True,
                              text=True, timeout=300, env=subprocess_env())
        assert done.returncode == 0, done.stderr
        tables[ranks] = list(csv.DictReader(out.open()))
    assert len(tables[1]) == len(tables[2]) == 2
    for single, sharded in zip(tables[1], tables[2]):
        for key in ("checkpoint", "model_fingerprint", "forward_passes", "converged"):
            assert sharded[key] == single[key], key
        for key in ("critical_lr", "critical_sharpness", "loss_at_origin", "update_critical_sharpness"):
            assert float(sharded[key]) == pytest.approx(float(single[key]), rel=1e-6, abs=0), key


GRADIENT_WORKER = """
import sys
import torch
from landscape import sharding
from landscape.critical import loss_gradient
from landscape.inputs import sample_batches
from landscape.models import load_model
from landscape.runtime import end_torchrun_process, join_torchrun, leave_torchrun
from landscape.settings import SampleSpec

join_torchrun("cpu")
sample = SampleSpec(corpus=sys.argv[2], max_samples=4, seq_len=16, batch_size=2)
whole = load_model(sys.argv[1], device="cpu")
expected, expected_loss = loss_gradient(whole.model, sample_batches(whole, sample), whole.kind)
loaded = load_model(sys.argv[1], device="cpu", layout=sharding.shard_layout(2))
batches = sample_batches(loaded, sample)
params = dict(loaded.model.named_parameters())
for p in params.values():  # gradients a caller left: neither added in nor lost
    p.grad = torch.full_like(p, 7.0)
gradient, loss = loss_gradient(loaded.model, batches, loaded.kind)
assert loss == expected_loss, (loss, expected_loss)
for name, p in params.items():
    start, stop = sharding.local_rows(p)
    assert gradient[name].shape == sharding.local_tensor(p).shape, name
    assert torch.allclose(gradient[name], expected[name][start:stop], rtol=1e-5, atol=1e-7), name
    assert torch.equal(sharding.local_tensor(p.grad), torch.full_like(sharding.local_tensor(p), 7.0)), name
open(f"{sys.argv[3]}/rank{torch.distributed.get_rank()}.ok", "w").close()
leave_torchrun()
end_torchrun_process(0)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_the_sharded_gradient_is_each_ranks_rows_of_the_whole_one(tiny_llama_dir, tiny_corpus_file, tmp_path):
    """Each rank's rows of ∇L from FSDP2's backward equal those rows of one process's autograd.grad.

    1e-5 relative: the same float32 sums in another order (a backward through gathered blocks).
    """
    import subprocess
    import textwrap

    from conftest import subprocess_env, torchrun_cmd

    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(GRADIENT_WORKER))
    done = subprocess.run(torchrun_cmd(script, tiny_llama_dir, tiny_corpus_file, tmp_path), capture_output=True,
                          text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]  # files: no shared pipe
