"""A researcher's first day (issue 30): the documented LoRA schedule from the base model's Fisher,
wrong inputs refused before any model loads, a folder without a tokenizer, the demo's Fisher resumed
after Ctrl-C, a long sample said at the start and a resumed pass saying where it resumed."""

import json
import signal
import subprocess

import pytest
import torch
from conftest import ROOT, cli_in_process, ctrl_c_as_in_a_terminal, landscape_cmd, one_line, shown_lines, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = ("--max-samples", 8, "--seq-len", 16, "--batch-size", 4)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A causal-LM LoRA adapter of the tiny Llama (q_proj, v_proj) with nonzero B factors."""
    peft = pytest.importorskip("peft", reason="peft is the optional extra landscape[lora]")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def files(tiny_llama_dir, adapter_dir, tiny_corpus_file, tmp_path_factory):
    """Fishers of the base, of its adapter and of another model, a direction file and a surface of the base."""
    from landscape.cli import main

    folder = tmp_path_factory.mktemp("inputs")
    made = {name: folder / name for name in ("base.safetensors", "adapter.safetensors", "embedded.safetensors",
                                             "D.h5", "S.h5")}
    for model, name in ((tiny_llama_dir, "base.safetensors"), (adapter_dir, "adapter.safetensors")):
        assert main([str(a) for a in ("fisher", "--model", model, "--corpus", tiny_corpus_file, *SAMPLE,
                                      "--quiet", "--out", made[name])]) == 0
    assert main([str(a) for a in ("fisher", "--max-samples", 2, "--seq-len", 16, "--quiet",
                                  "--out", made["embedded.safetensors"])]) == 0
    assert main([str(a) for a in ("directions", "--model", tiny_llama_dir, "--out", made["D.h5"])]) == 0
    assert main([str(a) for a in ("surface", "--model", tiny_llama_dir, "--directions", made["D.h5"], "--corpus",
                                  tiny_corpus_file, *SAMPLE, "--x", "-1:1:3", "--y", "-1:1:3",
                                  "--out", made["S.h5"])]) == 0
    return made


def _sites(path):
    return [(s["name"], s["rank"], s["p"], s["score"]) for s in json.loads(path.read_text())["sites"]]


# ----------------------------------------------------------------------------- item 1: LoRA schedules
def test_a_lora_schedule_of_an_adapter_takes_its_base_models_fisher(files, adapter_dir, tiny_llama_dir, capfd,
                                                                     tmp_path):
    """As docs/finetune.md says: the base's Fisher scores the adapter's LoRA modules by their base weights,
    the same schedule as the base wrapped with the adapter's targets."""
    code, out, err = cli_in_process(capfd, "schedule", files["base.safetensors"], "--model", adapter_dir, "--lora",
                                    "--out", tmp_path / "adapter.json")
    assert code == 0, err
    code, _, err = cli_in_process(capfd, "schedule", files["base.safetensors"], "--model", tiny_llama_dir, "--lora",
                                  "targets=q_proj,v_proj", "--out", tmp_path / "base.json")
    assert code == 0, err
    assert _sites(tmp_path / "adapter.json") == _sites(tmp_path / "base.json")
    assert len(_sites(tmp_path / "base.json")) == 4


def test_a_fisher_of_neither_the_adapter_nor_its_base_is_refused_naming_both_ways_out(files, adapter_dir, capfd,
                                                                                       tmp_path):
    code, _, err = cli_in_process(capfd, "schedule", files["embedded.safetensors"], "--model", adapter_dir, "--lora",
                                  "--out", tmp_path / "s.json")
    line = one_line(code, err, "neither", "its base", "--model")
    assert str(adapter_dir) in line and "landscape fisher --model" in line
    # Without --lora an adapter's dropout sites are scored by the adapter's own Fisher: the base's is refused.
    code, _, err = cli_in_process(capfd, "schedule", files["base.safetensors"], "--model", adapter_dir,
                                  "--out", tmp_path / "s.json")
    one_line(code, err, "made for another model")


# ----------------------------------------------------------------------------- item 5: inputs before models
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the refusals must come first."""
    import landscape.guided.training
    import landscape.models

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(landscape.models, "load_model", load_model)
    monkeypatch.setattr(landscape.guided.training, "load_classifier", load_model)


@pytest.mark.parametrize("command, words", [
    ("profile {S} --model {base} --out {tmp}/p", ("is a loss surface (an HDF5 file), not a Fisher file",)),
    ("schedule {S} --model {base} --out {tmp}/s.json", ("is a loss surface (an HDF5 file), not a Fisher file",)),
    ("directions --model {base} --fisher {S} --subset top:5 --out {tmp}/d.h5", ("is a loss surface", "Fisher")),
    ("hessian --model {base} --fisher {S} --subset top:5 --out {tmp}/h.json", ("is a loss surface", "Fisher")),
    ("surface --model {base} --directions {S} --out {tmp}/s.h5", ("is a loss surface", "not a direction file")),
    ("surface --model {base} --directions {F} --out {tmp}/s.h5", ("is a Fisher file (a safetensors file)",)),
    ("profile {Fa} --model {base} --out {tmp}/p", ("Fisher file", "made for another model")),
    ("directions --model {adapter} --fisher {F} --subset top:5 --out {tmp}/d.h5", ("made for another model",)),
    ("hessian --model {adapter} --fisher {F} --subset top:5 --out {tmp}/h.json", ("made for another model",)),
    ("surface --model {adapter} --directions {D} --out {tmp}/s.h5", ("direction file", "made for another model")),
    ("finetune --model {base} --schedule {S} --regularizer guided --out {tmp}/r.csv",
     ("is a loss surface", "not a dropout schedule")),
    ("finetune --model {base} --fisher {Fa} --regularizer guided --out {tmp}/r.csv", ("made for another model",)),
])
def test_a_wrong_input_file_is_refused_before_any_model_loads(command, words, files, tiny_llama_dir, adapter_dir,
                                                              no_model_loads, capfd, tmp_path):
    args = command.format(S=files["S.h5"], F=files["base.safetensors"], Fa=files["adapter.safetensors"],
                          D=files["D.h5"], base=tiny_llama_dir, adapter=adapter_dir, tmp=tmp_path).split()
    one_line(*cli_in_process(capfd, *args)[::2], *words)


# ----------------------------------------------------------------------------- item 3: the tokenizer
def test_a_model_folder_without_a_tokenizer_is_one_line_saying_so(tiny_llama_dir, tiny_corpus_file, capfd, tmp_path):
    import shutil

    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    line = one_line(*cli_in_process(capfd, "fisher", "--model", folder, "--corpus", tiny_corpus_file, *SAMPLE,
                                    "--out", tmp_path / "F.safetensors")[::2], "has no tokenizer", "tokenizer.json")
    assert str(folder) in line and "backend" not in line


# ----------------------------------------------------------------------------- item 6: long and resumed passes
def test_a_long_cpu_pass_says_so_at_the_start_with_the_options_that_shorten_it(tiny_llama_dir, tiny_corpus_file,
                                                                              monkeypatch, capfd, tmp_path):
    from landscape.fisher import budget

    code, _, err = cli_in_process(capfd, "fisher", "--model", tiny_llama_dir, "--corpus", tiny_corpus_file, *SAMPLE,
                                  "--out", tmp_path / "short.safetensors")
    assert code == 0 and "note:" not in err
    # The same pass, had each element cost what makes it last over 5 minutes.
    monkeypatch.setattr(budget, "CPU_SECONDS_PER_TOKEN_PARAMETER", budget.LONG_SAMPLE_SECONDS / (8 * 16 * 5000))
    code, _, err = cli_in_process(capfd, "fisher", "--model", tiny_llama_dir, "--corpus", tiny_corpus_file, *SAMPLE,
                                  "--out", tmp_path / "long.safetensors")
    notes = [line for line in shown_lines(err) if line.startswith("note:")]
    assert code == 0 and len(notes) == 1, err
    assert "8 samples of 16 tokens" in notes[0] and "--max-samples" in notes[0] and "--fraction" in notes[0]


def test_a_resumed_fisher_says_what_it_resumed_from(tiny_llama_dir, tiny_corpus_file, monkeypatch, capfd, tmp_path):
    from landscape.fisher.accumulator import FisherAccumulator

    out = tmp_path / "F.safetensors"
    args = ("fisher", "--model", tiny_llama_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--checkpoint-every", 0,
            "--out", out)
    add_batch, calls = FisherAccumulator.add_batch, []

    def interrupted_second(self, *a, **k):  # Ctrl-C during the second batch: the first one is kept
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return add_batch(self, *a, **k)

    monkeypatch.setattr(FisherAccumulator, "add_batch", interrupted_second)
    assert cli_in_process(capfd, *args)[0] == 130
    monkeypatch.setattr(FisherAccumulator, "add_batch", add_batch)
    code, _, err = cli_in_process(capfd, *args)
    said = [line for line in shown_lines(err) if line.startswith("resuming")]
    assert code == 0 and said == [f"resuming from '{out}.ckpt': 4 of 8 samples done"], err


# ----------------------------------------------------------------------------- item 4: the demo's Fisher
DEMO_SAMPLES = 128  # 8 batches of the demo's 16
def _demo(out, until_stage_one=False, interrupt_after=None):
    """Run the demo into ``out`` until its first stage is done, or Ctrl-C it once: when its progress bar
    first counts a sample, else ``interrupt_after`` seconds after that stage (the Fisher pass) began.

    Returns (exit code, stdout and stderr).
    """
    import re
    import threading

    cmd = landscape_cmd("demo", "--out", out, "--fisher-samples", DEMO_SAMPLES, "--threads", 1)
    child = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=ctrl_c_as_in_a_terminal, text=True, bufsize=1)
    seen, timer, once, sent = [], None, threading.Lock(), []

    def ctrl_c():  # one Ctrl-C only: a second one stops at once, before the checkpoint is saved
        with once:
            if not sent:
                sent.append(child.send_signal(signal.SIGINT))

    try:
        for line in child.stdout:
            seen.append(line)
            if interrupt_after is not None and timer is None and "[1/7]" in line and line.rstrip().endswith("..."):
                timer = threading.Timer(interrupt_after, ctrl_c)
                timer.start()
            if timer is not None and re.search(rf"fisher:.* [1-9][0-9]*/{DEMO_SAMPLES} ", line):
                ctrl_c()
            if until_stage_one and "[1/7]" in line and "done in" in line:
                child.kill()  # the later stages are not what this test is about
                break
        child.wait(timeout=300)
    finally:
        if timer is not None:
            timer.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, "".join(seen)


@pytest.mark.slow
def test_ctrl_c_in_the_demos_fisher_then_a_rerun_resumes_to_the_uninterrupted_file(tmp_path):
    reference = tmp_path / "reference"
    assert "done in" in _demo(reference, until_stage_one=True)[1]
    resumed = tmp_path / "resumed"
    for wait in (2, 5, 10, 20):  # Ctrl-C must land inside the pass, after its samples are read
        code, text = _demo(resumed, interrupt_after=wait)
        assert code == 130, text
        if (resumed / "stability.csv.ckpt").exists():
            break
    else:
        pytest.fail("no interrupt landed inside the Fisher pass")
    code, text = _demo(resumed, until_stage_one=True)
    said = [line for line in shown_lines(text) if line.startswith("resuming from")]
    assert len(said) == 1 and "stability.csv.ckpt': " in said[0], text
    assert said[0].endswith(f" of {DEMO_SAMPLES} samples done"), said
    assert 0 < int(said[0].split("': ")[1].split()[0]) <= DEMO_SAMPLES
    for name in ("fisher.safetensors", "stability.csv"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (resumed / "stability.csv.ckpt").exists()


@pytest.mark.slow  # a benchmark script in its own process
def test_the_lora_schedule_agreement_benchmark_runs_and_prints_its_numbers(tiny_llama_dir, tmp_path):
    """``benchmarks/lora_schedule_agreement.py``, which docs/finetune.md quotes, in its smallest form."""
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_schedule_agreement.py"), "--model",
                             str(tiny_llama_dir), "--steps", "2", "--train-seq-len", "16", "--max-samples", "4",
                             "--seq-len", "16", "--threads", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 LoRA sites" in result.stdout and "Spearman of p" in result.stdout and "max |p_base" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.safetensors", "base.safetensors",
                                                           "from_adapter.json", "from_base.json"]


def test_a_resumed_surface_says_what_it_resumed_from(files, tiny_llama_dir, tiny_corpus_file, monkeypatch, capfd,
                                                     tmp_path):
    import landscape.surface.run as surface_run

    out = tmp_path / "S.h5"
    args = ("surface", "--model", tiny_llama_dir, "--directions", files["D.h5"], "--corpus", tiny_corpus_file,
            *SAMPLE, "--x", "-1:1:3", "--y", "-1:1:3", "--out", out)
    evaluate = surface_run.evaluate_rounds

    def two_points_then_ctrl_c(model, directions, batches, points, todo, *rest, **options):
        evaluate(model, directions, batches, points, todo[:2], *rest, **options)
        raise KeyboardInterrupt

    monkeypatch.setattr(surface_run, "evaluate_rounds", two_points_then_ctrl_c)
    assert cli_in_process(capfd, *args)[0] == 130
    monkeypatch.setattr(surface_run, "evaluate_rounds", evaluate)
    code, _, err = cli_in_process(capfd, *args)
    said = [line for line in shown_lines(err) if line.startswith("resuming")]
    assert code == 0 and said == [f"resuming '{out}': 2 of 9 points done"], err
