"""Every numeric option is checked before any work, by the shared domains of ``landscape.checks``.

The table is read from the parsers: every option of every subcommand whose type is a number, a
comma-separated list of numbers or a MIN:MAX:NUM range gets 0, -1, nan, inf and a huge value
wherever its own declared domain says the value is wrong, and must end in exit code 2 with one
line naming the option, quickly, writing nothing.  A new numeric option is covered without editing
this file, and one declared with a plain ``type=int``/``float`` (no domain to read) fails here.
Parse-level refusals are checked in-process; a few of the campaign's cases also as real processes.
"""

import argparse
import math
import subprocess
import time
from pathlib import Path

import pytest
from conftest import landscape_cmd, subprocess_env

from landscape import checks
from landscape.cli import build_parser, main
from landscape.cli import options as opts
from landscape.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ("0", "-1", "nan", "inf", "-inf", "1e308", str(10**12))
SECONDS = 3.0  # a parse-level refusal takes milliseconds; generous for a shared two-core machine


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


SUBCOMMANDS = _subcommands()


def _is_plain_number(action):
    default = action.default
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    return action.type in (int, float) or (action.type is None and numeric_default and action.nargs != 0)


def _numeric_options():
    for command, parser in SUBCOMMANDS.items():
        for action in parser._actions:
            if action.option_strings and (hasattr(action.type, "domain") or action.type in (int, float)):
                yield command, action


def _bad_values(action):
    """The values among CANDIDATES that the option's own domain (or its choices) rules out."""
    kind = action.type
    if action.choices is not None:
        return [v for v in CANDIDATES if _convert(kind, v) not in action.choices]
    if kind.form == "number":
        return [v for v in CANDIDATES if v not in kind.domain]
    if kind.form == "list":
        bad = [v for v in CANDIDATES if v not in kind.domain]
        valid = next(iter(str(action.default or "").split(",")), "")
        return bad + ([f"{valid},{bad[0]}"] if valid and bad else [])
    return ["nan:1:3", "-1:inf:3", "-1e308:1e308:3", "-1e39:1e39:3", f"-{checks.COORD_MAX * 10:g}:1:3",
            f"-1:{checks.COORD_MAX * 2:g}:3", "1:-1:3", "-1:1:0", "-1:1:-1", "-1:1:nan",
            f"-1:1:{kind.num_max + 1}", f"-1:1:{10**12}", "-1:1", "0"]


def _convert(kind, text):
    try:
        return kind(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return None


def _base_argv(command, parser, folder):
    """The subcommand with every required argument given (none of them is read: parsing fails first)."""
    argv = [command]
    for action in parser._actions:
        if not action.option_strings and action.dest not in ("help",):
            argv.append(str(folder / "input"))
        elif action.required:
            argv += [action.option_strings[0], str(folder / "output")]
    return argv


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_numeric_option_declares_its_domain(command):
    for action in SUBCOMMANDS[command]._actions:
        if action.choices is None and _is_plain_number(action):
            pytest.fail(f"{command} {action.option_strings[0]}: a number without a domain; give it a type from "
                        "landscape.cli.options (or choices)")


NUMERIC = list(_numeric_options())

# Numeric options without an upper bound, and why none is needed: a huge value asks for no more
# than the largest sensible one (a cap on what the data holds, an interval longer than any run), or
# it is a value of the method that costs no memory or time (a diverged run is a result).  Any other
# numeric option needs one: 1e308 or 10**12 would exhaust memory or time, or overflow on the way.
# ``test_unbounded_options_take_a_huge_value`` runs each of these with one.
UNBOUNDED = {
    "--max-samples": "a cap: at most the sequences the corpus gives",
    "--max-train": "a cap: at most the training rows", "--max-test": "a cap: at most the test rows",
    "--fisher-samples": "a cap: at most the sequences the corpus gives",
    "--eval-samples": "a cap: at most the sequences the corpus gives",
    "--batch-size": "a cap: a batch holds at most every sample",
    "--points-per-pass": "a cap: a pass holds at most every point of the grid",
    "--checkpoint-every": "seconds: longer than the run is one checkpoint at the end",
    "--flush-seconds": "seconds: longer than the run is one write at the end (the journal keeps every point)",
    "--shard-size": "must divide the number of ranks, refused in one line otherwise",
    "--zmin": "a figure's clipping bound", "--zmax": "a figure's clipping bound",
    "--radius": "a radius over the grid: a huge one is the whole grid",
    "--fit-radius": "a radius over the grid: a huge one is the whole grid",
    "--gamma": "the power schedule's exponent: a huge one gives every site p_lower but the top one",
    "--lr": "a value of the method: a diverged run is a result", "--weight-decay": "a value of the method",
    "--r3f-lambda": "a value of the method", "--r3f-sigma": "a value of the method",
}


def test_every_numeric_option_has_an_upper_bound_or_a_reason_for_none():
    unbounded = {(command, action.option_strings[0]) for command, action in NUMERIC
                 if action.choices is None and action.type.domain.high is None}
    missing = sorted(f"{command} {option}" for command, option in unbounded if option not in UNBOUNDED)
    assert not missing, f"numeric options without an upper bound (a huge value exhausts memory or time): {missing}"
    stale = sorted(set(UNBOUNDED) - {option for _, option in unbounded})
    assert not stale, f"UNBOUNDED names options that have a bound now or no longer exist: {stale}"


def test_the_table_is_not_empty():
    assert len(NUMERIC) > 60, [f"{c} {a.option_strings[0]}" for c, a in NUMERIC]


@pytest.mark.parametrize("command,action", NUMERIC, ids=[f"{c} {a.option_strings[0]}" for c, a in NUMERIC])
def test_out_of_domain_values_are_one_line_and_exit_2(command, action, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    option = action.option_strings[0]
    base = _base_argv(command, SUBCOMMANDS[command], tmp_path)
    build_parser().parse_args(base)  # the base is valid: a refusal below is the option's own
    bad = _bad_values(action)
    assert bad, f"{command} {option}: no candidate is outside its domain; is the domain right?"
    for value in bad:
        started = time.perf_counter()
        with pytest.raises(SystemExit) as done:
            main([*base, f"{option}={value}"])
        seconds = time.perf_counter() - started
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert done.value.code == 2, (value, err)
        assert len(lines) == 1, (value, err)
        assert lines[0].startswith(f"landscape {command}: error: argument {option}"), (value, err)
        assert "must" in lines[0] or "invalid" in lines[0], lines[0]
        assert seconds < SECONDS, f"{command} {option}={value} took {seconds:.1f} s"
        assert list(tmp_path.iterdir()) == [], f"{command} {option}={value} wrote something"


# The campaign's cases (issue 19), each as a real process: exit 2, one line naming the option,
# no output file, quickly.
CAMPAIGN = [
    (["finetune", "--seq-len", "0"], "--seq-len"),
    (["finetune", "--warmup", "2"], "--warmup"),
    (["finetune", "--lr", "nan"], "--lr"),
    (["compare", "a.h5", "--radius", "nan"], "--radius"),
    (["surface", "--directions", "d.h5", "--x=-1e308:1e308:3"], "--x"),
    (["plot", "a.h5", "--kind", "contour", "--levels", "50000000"], "--levels"),
    (["directions", "--kind", "hessian", "--batch-size", "0"], "--batch-size"),
    # issue 28: a float overflow traceback leaving s.h5 and its journal; libgomp out of memory
    (["surface", "--directions", "d.h5", "--x=-1e39:1e39:3"], "--x"),
    (["fisher", "--threads", "1000000000"], "--threads"),
    (["fisher", "--max-chunk-mb", "1e308"], "--max-chunk-mb"),
    (["hessian", "--cache-mb", "1e308"], "--cache-mb"),
    (["hessian", "--basis-mb", "1e308"], "--basis-mb"),
    (["hessian", "--trace", str(10**12)], "--trace"),
]


@pytest.mark.parametrize("argv,option", CAMPAIGN, ids=[" ".join(a) for a, _ in CAMPAIGN])
def test_campaign_cases_as_processes(argv, option, tmp_path):
    suffix = {"finetune": ".csv", "directions": ".h5", "surface": ".h5"}.get(argv[0], ".png")
    started = time.perf_counter()
    result = subprocess.run(landscape_cmd(*argv, "--out", f"out{suffix}"), capture_output=True, text=True,
                            cwd=tmp_path, env=subprocess_env(), timeout=60)
    seconds = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and f"argument {option}: must" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []
    assert seconds < 10.0, f"{' '.join(argv)} took {seconds:.1f} s"


# ----------------------------------------------------------------------------- the library's side
def test_domains_in_words_and_values():
    assert checks.positive_int("3", "n") == 3 and checks.fraction(1, "f") == 1.0
    assert checks.FRACTION.describe() == "a number in (0, 1]"
    assert checks.POSITIVE.describe() == "a finite number > 0"
    assert checks.grid_range("-1:1:21", "x") == (-1.0, 1.0, 21)
    assert checks.number_list("0.5, 0.1,", "f", checks.FRACTION) == [0.5, 0.1]
    for call in (lambda: checks.positive_int(0, "batch_size"), lambda: checks.positive_int(2.0, "batch_size"),
                 lambda: checks.positive_int(True, "batch_size"), lambda: checks.finite_float(math.nan, "zmin"),
                 lambda: checks.probability(1.5, "warmup"), lambda: checks.seed(-1),
                 lambda: checks.grid_range("-1e308:1e308:3", "x"), lambda: checks.grid_range("-1:1:1", "x"),
                 lambda: checks.number_list(",", "f", checks.FRACTION)):
        with pytest.raises(UsageError):
            call()


def test_the_api_refuses_what_the_options_refuse():
    from landscape.guided.training import FinetuneConfig
    from landscape.plots.surfaces import Style
    from landscape.surface import parse_range

    for bad in ({"lr": -1.0}, {"lr": math.nan}, {"warmup": 2.0}, {"batch_size": 0}, {"seq_len": 0},
                {"r3f_sigma": -1.0}, {"epochs": 0}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            FinetuneConfig(**bad)
    with pytest.raises(UsageError, match="zmin"):
        Style(zmin=math.nan).validate()
    with pytest.raises(UsageError, match="levels"):
        Style(levels=50_000_000).validate()
    with pytest.raises(UsageError, match="finite MAX - MIN"):
        parse_range("-1e308:1e308:3")


def test_options_keep_their_defaults_through_the_types():
    # A list or range option's value stays its text, as the stages and stored settings expect it.
    args = SUBCOMMANDS["surface"].parse_args(["--directions", "d.h5", "--out", "s.h5"])
    assert args.x == "-1:1:21" and args.y is None and args.seed == 0 and args.seq_len == 128
    assert isinstance(opts.RANGE("-2:2:5"), str) and opts.FRACTIONS("1,0.5") == "1,0.5"


def test_the_api_refuses_instead_of_falling_back(tiny_bert, tiny_corpus_file, write_surface, tmp_path):
    import numpy as np

    from landscape import corpus, directions, fisher, surface
    from landscape.fisher.accumulator import FisherAccumulator
    from landscape.surface import sharpness
    from landscape.surface.file import SurfaceFile, read_surface

    model = tiny_bert.model
    batches = corpus.load_batches(tiny_bert, str(tiny_corpus_file), max_samples=2, seq_len=16, batch_size=2)
    with pytest.raises(UsageError, match="points_per_pass"):  # once silently taken as 1
        surface.evaluate(model, [directions.random_direction(model, seed=0)], batches, [0.0, 1.0], points_per_pass=0,
                         kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="checkpoint_every"):  # NaN would never be due
        fisher.compute_fisher(model, batches, checkpoint=tmp_path / "c", checkpoint_every=math.nan, kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="max_chunk_mb"):  # 0 was one element per chunk
        FisherAccumulator(model, max_chunk_mb=0, kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="flush_seconds"):
        SurfaceFile(tmp_path / "s.h5", np.linspace(-1, 1, 3), None, {}, {}, flush_seconds=math.nan)
    bowl = read_surface(write_surface("bowl.h5", lambda x: x**2))
    with pytest.raises(UsageError, match="radius"):  # NaN compared as no point and wrote a figure
        sharpness.summarize(bowl, radius=math.nan)
    assert list(tmp_path.glob("c*")) == [] and not (tmp_path / "s.h5").exists()


# ----------------------------------------------------------------------------- upper bounds and folders (issue 28)
def test_the_api_bounds_what_the_options_bound(tiny_bert, tiny_corpus_file, tmp_path, monkeypatch):
    import torch

    from landscape import corpus, directions, surface
    from landscape.curvature import run_hessian
    from landscape.datahome import data_home
    from landscape.fisher.accumulator import FisherAccumulator
    from landscape.guided.finetune import run_finetune
    from landscape.guided.training import FinetuneConfig
    from landscape.settings import FinetuneSettings, GridSpec, HessianSettings, ModelSpec, ProfileSettings

    for call, words in ((lambda: surface.parse_range("-1e39:1e39:3"), "MIN and MAX in"),
                        (lambda: checks.grid_range("-2e6:0:3", "x"), "MIN and MAX in"),
                        (lambda: FinetuneConfig(epochs=10**9), "epochs"),
                        (lambda: FisherAccumulator(tiny_bert.model, kind=tiny_bert.kind, max_chunk_mb=1e308),
                         "max_chunk_mb"),
                        (lambda: HessianSettings(trace=10**12), "trace"),
                        (lambda: HessianSettings(spectrum=10**6), "spectrum"),
                        (lambda: HessianSettings(max_iter=10**12), "max_iter"),
                        (lambda: HessianSettings(cache_mb=1e308), "cache_mb"),
                        (lambda: HessianSettings(basis_mb=-1), "basis_mb"),
                        (lambda: FinetuneSettings(restarts=10**9), "restarts")):
        with pytest.raises(UsageError, match=words):
            call()
    # folders: the data home and the folder of saved models, refused before any work
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path / "afile"))
    settings = HessianSettings(ModelSpec(str(tmp_path / "nowhere")))
    for call in (data_home, lambda: run_hessian(settings, out=tmp_path / "H.json")):
        with pytest.raises(UsageError, match="the data home '.*afile' is a file, not a folder; set LANDSCAPE_DATA"):
            call()
    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path / "afile" / "sub"))
    with pytest.raises(UsageError, match="afile' is a file, not a folder"):
        data_home()
    monkeypatch.delenv("LANDSCAPE_DATA")
    from landscape.demo import run_demo
    from landscape.guided.profile import run_profile

    for folder in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        for call in (lambda: run_finetune(FinetuneSettings(dataset=str(tiny_corpus_file)), out=str(tmp_path / "r.csv"),
                                          save_models=str(folder)),
                     lambda: run_profile(ProfileSettings(tmp_path / "F.safetensors"), out=folder),
                     lambda: run_demo(folder)):
            with pytest.raises(UsageError, match=r"'.*afile' is a file, not a folder"):
                call()
    # coordinates whose products with a direction's values overflow the weights
    model = tiny_bert.model
    batches = corpus.load_batches(tiny_bert, str(tiny_corpus_file), max_samples=2, seq_len=16, batch_size=2)
    huge = {n: torch.full_like(p, 1e33) for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match="overflow the model's float32"):
        surface.evaluate(model, [huge], batches, [0.0, 1e6], kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="x must hold finite coordinates"):
        GridSpec(x=[0.0, 1e39])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    steep = [directions.random_direction(model, seed=0)]
    assert surface.evaluate(model, steep, batches, [0.0, 1e6], kind=tiny_bert.kind).shape == (2,)
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob("*.json"))


def test_unbounded_options_take_a_huge_value(tiny_bert_dir, tiny_corpus_file, tmp_path, capfd):
    """What ``UNBOUNDED`` says: each of these options given 10**12 or 1e308 runs as with the largest sensible value."""
    from conftest import cli_in_process as _cli

    big, far = str(10**12), "1e308"
    sample = ["--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--seq-len", 16, "--max-samples", big,
              "--batch-size", big]
    runs = [["fisher", *sample, "--checkpoint-every", far, "--quiet", "--out", tmp_path / "F.safetensors"],
            ["directions", "--model", tiny_bert_dir, "--dims", 2, "--out", tmp_path / "d.h5"],
            ["surface", *sample, "--directions", tmp_path / "d.h5", "--points-per-pass", big, "--flush-seconds", far,
             "--x", "-1:1:3", "--y", "-1:1:3", "--out", tmp_path / "s.h5"],
            ["plot", tmp_path / "s.h5", "--kind", "contour", "--zmin", "-" + far, "--zmax", far, "--out",
             tmp_path / "p.png"],
            ["compare", tmp_path / "s.h5", "--radius", far, "--fit-radius", far, "--out", tmp_path / "c.png"],
            ["export", "--vtk", tmp_path / "s.h5", "--zmax", far, "--out", tmp_path / "s.vtp"],
            ["schedule", tmp_path / "F.safetensors", "--model", tiny_bert_dir, "--shape", "power", "--gamma", far,
             "--out", tmp_path / "g.json"]]
    for args in runs:
        code, _, err = _cli(capfd, *args)
        assert code == 0, (args[0], err)
    code, _, err = _cli(capfd, "surface", *sample, "--directions", tmp_path / "d.h5", "--shard-size", big, "--out",
                        tmp_path / "s2.h5")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ----------------------------------------------------------------------------- repeated list items
# A list item given twice once trained every run twice with the same seed (`finetune --fractions 1,1`
# reported 2 pairs, smallest p 0.5, for one restart); lists whose items name runs, rows or series
# refuse a repeat, LoRA targets and layers (sets of modules) merge it.
REPEATS = [
    (["finetune", "--fractions", "1,1.0", "--out", "o.csv"], "argument --fractions: must not repeat a value, got 1"),
    (["stability", "--fractions", "0.1,0.1", "--out", "o.csv"], "argument --fractions: must not repeat"),
    (["stability", "--top", "5,1,5", "--out", "o.csv"], "argument --top: must not repeat a value, got 5"),
    (["finetune", "--regularizer", "none,dropout,none", "--out", "o.csv"], "regularizer 'none' is listed twice"),
    (["compare", "a.h5", "b.h5", "--labels", "x,x", "--out", "c.png"], "label 'x' is given twice"),
]


@pytest.mark.parametrize("argv,words", REPEATS, ids=[" ".join(a[:3]) for a, _ in REPEATS])
def test_repeated_list_items_are_one_line_before_anything_loads(argv, words, tmp_path):
    for name in ("a.h5", "b.h5"):
        (tmp_path / name).write_bytes(b"")  # never opened: the labels are refused first
    result = subprocess.run(landscape_cmd(*argv), capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(),
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]


def test_the_api_refuses_repeated_list_items_and_merges_lora_sets(tmp_path):
    from landscape.guided.lora import parse_lora_spec
    from landscape.plots.surfaces import check_labels
    from landscape.settings import FinetuneSettings, StabilitySettings

    with pytest.raises(UsageError, match="fractions must not repeat a value, got 0.5"):
        FinetuneSettings(fractions=[0.5, 1.0, 0.5])
    with pytest.raises(UsageError, match="regularizer 'none' is listed twice"):
        FinetuneSettings(regularizer=["none", "none"])
    with pytest.raises(UsageError, match="regularizer 'dropout' is listed twice"):
        FinetuneSettings(regularizer="dropout, guided,dropout")
    with pytest.raises(UsageError, match="unknown regularizer 'drop'; use any of none, dropout"):
        FinetuneSettings(regularizer="none,drop")
    with pytest.raises(UsageError, match="top must not repeat"):
        StabilitySettings(top=(1.0, 1.0))
    with pytest.raises(UsageError, match="top must not repeat"):
        StabilitySettings(top="1,1")
    with pytest.raises(UsageError, match="label 'a' is given twice"):
        check_labels(["a", "a"], ["x.h5", "y.h5"])
    assert check_labels(None, ["p/x.h5", "q/x.h5"]) == ["x", "x"]  # file names: the user did not choose them
    with pytest.raises(UsageError, match="key 'r' is given twice"):
        parse_lora_spec("r=8,r=16")
    spec = parse_lora_spec("targets=q_proj,v_proj,q_proj,layers=0-2+1")
    assert spec["targets"] == ["q_proj", "v_proj"] and spec["layers"] == [0, 1, 2]
    assert list(tmp_path.iterdir()) == []
