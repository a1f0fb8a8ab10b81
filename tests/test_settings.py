"""Settings objects: one home per default, help text and domain, shared by the parsers and the stages.

The parsers of the commands that take a settings class are generated from its fields, so every
field is an option with the field's default and help, and the option and the API argument refuse
the same values with the same words.  A stage accepts a model already loaded and refuses one its
settings contradict; it applies its thread setting and leaves torch's thread count as it found it.
"""

import argparse
from dataclasses import MISSING, fields

import pytest
import torch

import landscape
from landscape import settings as S
from landscape.cli import build_parser, main
from landscape.cli.generated import settings_from_args
from landscape.errors import UsageError

COMMANDS = {"fisher": S.FisherSettings, "stability": S.StabilitySettings, "surface": S.SurfaceSettings,
            "hessian": S.HessianSettings, "schedule": S.ScheduleSettings, "profile": S.ProfileSettings,
            "finetune": S.FinetuneSettings, "directions": S.DirectionsSettings,
            "critical-sharpness": S.CriticalSharpnessSettings}


def _subparser(command):
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _leaves(cls):
    """(option's dest, field, default, help) of every setting the command line offers, nested specs flattened
    (a spec's field with the name and help the stage gives it)."""
    for spec in fields(cls):
        if spec.default_factory is not MISSING and isinstance(spec.default_factory(), S.Settings):
            nested = spec.default_factory()
            for inner in fields(nested):
                if inner.name not in spec.metadata["exclude"]:
                    yield (spec.metadata["rename"].get(inner.name, inner.name), inner, getattr(nested, inner.name),
                           spec.metadata["helps"].get(inner.name, inner.metadata["help"]))
        else:
            yield spec.name, spec, spec.default, spec.metadata["help"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_an_option_with_its_default_and_help(command):
    actions = {a.dest: a for a in _subparser(command)._actions}
    for dest, spec, default, help_text in _leaves(COMMANDS[command]):
        action = actions[dest]
        assert action.help.startswith(help_text), spec.name
        if default is MISSING:
            assert action.required or not action.option_strings, spec.name
        elif isinstance(default, tuple):
            assert action.default == ",".join(f"{v:g}" for v in default), spec.name
        else:
            assert action.default == default, (command, spec.name, action.default, default)


@pytest.mark.parametrize("command", COMMANDS)
def test_parsed_defaults_give_the_settings_defaults(command, tmp_path):
    cls = COMMANDS[command]
    inputs = [str(tmp_path / "in")] if command in ("schedule", "profile") else []
    required = ["--directions", str(tmp_path / "d.h5")] if command == "surface" else []
    args = build_parser().parse_args([command, *inputs, *required, "--out", str(tmp_path / "out")])
    made = settings_from_args(cls, args)
    expected = cls(*inputs) if inputs else cls(str(tmp_path / "d.h5")) if required else cls()
    if command == "profile":  # its spec's own default device
        assert made.model.device == "cpu"
    assert made == expected


def test_the_api_refuses_what_the_option_refuses_with_the_same_words(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fisher", "--seq-len", "4", "--out", "F.safetensors"])
    option_line = capsys.readouterr().err.strip()
    with pytest.raises(UsageError) as refused:
        S.SampleSpec(seq_len=4)
    words = str(refused.value).split(" ", 1)[1]  # after the name: "must be an integer in [8, ...], got 4"
    assert words.replace("got 4", "got '4'") in option_line, (option_line, words)


def test_settings_round_trip_compare_and_name_their_identity():
    made = S.SurfaceSettings("d.h5", S.ModelSpec(dtype="BF16"), S.SampleSpec(max_samples=8, batch_size=3),
                             S.GridSpec(x=[-1, 0, 1]))
    assert made.model.dtype == "bfloat16" and made.grid.x == (-1.0, 0.0, 1.0)
    assert S.SurfaceSettings.from_dict(made.to_dict()) == made
    identity = made.identity()
    assert identity["model"] is None and identity["dtype"] == "bfloat16" and identity["max_samples"] == 8
    assert "batch_size" not in identity and "threads" not in identity  # they do not change the numbers
    assert made.replace(seq_len=64, x="-1:1:3").sample.seq_len == 64
    with pytest.raises(UsageError, match="no setting"):
        made.replace(nonsense=1)
    with pytest.raises(UsageError, match="model must be a ModelSpec, got str"):
        S.FisherSettings(model="gpt2")
    with pytest.raises(UsageError, match="must be a plain value, got SampleSpec"):
        S.SurfaceSettings(S.SampleSpec())
    with pytest.raises(UsageError, match="one_d and y contradict"):
        S.GridSpec(y="-1:1:3", one_d=True)
    with pytest.raises(UsageError, match="p_lower"):
        S.ScheduleSettings("F.safetensors", p_upper=0.1, p_lower=0.5)
    assert S.FisherSettings.from_dict({**S.FisherSettings().to_dict(), "from_a_newer_version": 1}) == S.FisherSettings()


def test_the_public_namespace_lists_the_stage_calls_and_settings():
    for name in ("run_fisher", "run_surface", "run_schedule", "run_profile", "run_stability", "FisherSettings",
                 "SurfaceSettings", "ModelSpec", "SampleSpec", "load_fisher", "read_surface", "load_schedule",
                 "run_finetune", "FinetuneSettings"):
        assert name in landscape.__all__ and getattr(landscape, name) is not None, name


def test_a_loaded_model_is_used_and_one_the_settings_contradict_is_refused(tiny_bert, tiny_bert_dir, tmp_path):
    sample = S.SampleSpec(max_samples=2, seq_len=16, batch_size=2)
    bf16 = S.FisherSettings(S.ModelSpec(dtype="bfloat16"), sample)
    with pytest.raises(UsageError, match="dtype bfloat16 but the loaded model holds float32"):
        landscape.run_fisher(bf16, out=tmp_path / "F.safetensors", model=tiny_bert, progress=False)
    other = S.FisherSettings(S.ModelSpec(str(tmp_path / "elsewhere")), sample)
    with pytest.raises(UsageError, match="the loaded model is"):
        landscape.run_fisher(other, out=tmp_path / "F.safetensors", model=tiny_bert, progress=False)
    assert not list(tmp_path.iterdir())
    loaded = landscape.run_fisher(S.FisherSettings(sample=sample), out=tmp_path / "a.safetensors", model=tiny_bert,
                                  progress=False)
    from_disk = landscape.run_fisher(S.FisherSettings(S.ModelSpec(str(tiny_bert_dir)), sample),
                                     out=tmp_path / "b.safetensors", progress=False)
    ours, theirs = landscape.load_fisher(loaded.path)[0], landscape.load_fisher(from_disk.path)[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.fingerprints == from_disk.fingerprints


def test_a_stage_applies_its_threads_and_restores_the_count(tiny_bert, tmp_path, monkeypatch):
    seen = []
    from landscape.fisher import run as fisher_run

    original = fisher_run.compute_fisher

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(fisher_run, "compute_fisher", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # an explicit count is not capped
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = S.FisherSettings(S.ModelSpec(threads="2"), S.SampleSpec(max_samples=2, seq_len=16))
        landscape.run_fisher(settings, out=tmp_path / "F.safetensors", model=tiny_bert, progress=False)
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_directions_settings_take_the_kind_from_to_and_checkpoints_as_the_command_does(tmp_path):
    args = build_parser().parse_args(["directions", "--trajectory", "a", "b", "c", "d", "--out", "d.h5"])
    plane = settings_from_args(S.DirectionsSettings, args)
    assert plane.kind == "trajectory" and plane.checkpoints == ("a", "b", "c", "d")  # nargs="+" as a tuple
    assert S.DirectionsSettings.from_dict(plane.to_dict()) == plane
    args = build_parser().parse_args(["directions", "--kind", "hessian", "--seed", "5", "--sample-seed", "3",
                                      "--max-samples", "8", "--out", "d.h5"])
    hessian = settings_from_args(S.DirectionsSettings, args)
    assert (hessian.seed, hessian.sample.seed, hessian.sample.max_samples) == (5, 3, 8)  # --sample-seed: sample.seed
    assert S.DirectionsSettings(to=tmp_path / "b").kind == "interpolation"
    assert S.DirectionsSettings(kind="random", to="b").kind == "interpolation"  # as `--kind random --to b`
    assert S.DirectionsSettings().sample == S.SampleSpec(max_samples=64)  # the defaults of `surface`


@pytest.mark.parametrize("settings, argv, words", [
    (dict(to="b", norm="layer"), ["--to", "b", "--norm", "layer"], "{to} writes raw parameter differences: "
                                                                   "{norm} does not apply"),
    (dict(checkpoints=["a", "b", "c", "d"], fisher="F.safetensors"), ["--trajectory", "a", "b", "c", "d", "--fisher",
     "F.safetensors"], "{checkpoints} writes raw parameter differences: {fisher}/{subset} do not apply"),
    (dict(sample=S.SampleSpec(corpus="x.txt")), ["--corpus", "x.txt"],
     "{corpus} sets the Hessian's sample: it applies to {kind} hessian only"),
    (dict(model=S.ModelSpec(device="cpu"), to="b"), ["--device", "cpu", "--to", "b"],
     "{device} applies to {kind} hessian only"),
    (dict(kind="hessian", orthogonal=True), ["--kind", "hessian", "--orthogonalize"], "{orthogonal} does not apply"),
    (dict(kind="hessian", model=S.ModelSpec(dtype="bfloat16")), ["--kind", "hessian", "--dtype", "bfloat16"],
     "{dtype} does not apply"),
    (dict(kind="hessian", to="b"), ["--kind", "hessian", "--to", "b"], "{kind} hessian and {to} contradict"),
    (dict(to="b", checkpoints=["a", "b", "c", "d"]), ["--to", "b", "--trajectory", "a", "b", "c", "d"],
     "{to} and {checkpoints} contradict"),
    (dict(kind="interpolation"), ["--kind", "interpolation"], "{kind} interpolation needs {to}"),
    (dict(subset="top:5"), ["--subset", "top:5"], "{subset} top:5 needs a Fisher file ({fisher} F.safetensors)"),
    (dict(model=S.ModelSpec(dtype="tf32")), ["--dtype", "tf32"], "{dtype} tf32 is a matmul precision"),
])
def test_directions_settings_refuse_what_the_kind_would_ignore_in_each_callers_words(settings, argv, words, tmp_path,
                                                                                      capsys):
    """A setting the kind does not read is refused (the keyword call refused an option its kind did not take):
    in the library's names from Python, with the options' names from the command line."""
    flags = {"checkpoints": "--trajectory", "orthogonal": "--orthogonalize"}
    library = words.format_map({name: name for name in ("to", "norm", "checkpoints", "fisher", "subset", "corpus",
                                                        "kind", "device", "orthogonal", "dtype")})
    with pytest.raises(UsageError) as refused:
        S.DirectionsSettings(**settings)
    assert library in str(refused.value) and "--" not in str(refused.value)
    code = main(["directions", *argv, "--out", str(tmp_path / "d.h5")])
    line = capsys.readouterr().err.strip()
    worded = words.format_map({name: flags.get(name, "--" + name) for name in ("to", "norm", "checkpoints", "fisher",
                                                                                "subset", "corpus", "kind", "device",
                                                                                "orthogonal", "dtype")})
    assert code == 2 and line.count("\n") == 0 and worded in line, line
    assert not list(tmp_path.iterdir())


def test_make_directions_refuses_a_loaded_model_its_settings_contradict(tiny_bert, tmp_path):
    bf16 = S.DirectionsSettings(S.ModelSpec(dtype="bfloat16"))
    with pytest.raises(UsageError, match="dtype bfloat16 but the loaded model holds float32"):
        landscape.make_directions(bf16, out=tmp_path / "d.h5", model=tiny_bert)
    with pytest.raises(UsageError, match="DirectionsSettings"):
        landscape.make_directions("random", out=tmp_path / "d.h5")  # the keyword call of old
    assert not list(tmp_path.iterdir())
    made = landscape.make_directions(S.DirectionsSettings(dims=1), out=tmp_path / "d.h5", model=tiny_bert)
    assert (made.computed, made.total, made.attributes["dims"]) == (1, 1, 1) and made.path.exists()
