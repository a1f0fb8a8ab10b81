"""``--threads``: every command that runs a model has it (default auto), auto leaves busy cores to
the processes that keep them busy, and a bad value is one line with exit code 2."""

import argparse
import subprocess

import pytest
import torch
from conftest import landscape_cmd, subprocess_env

from landscape import runtime
from landscape.cli import build_parser
from landscape.errors import UsageError

SUBCOMMANDS = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _options(parser):
    return {opt: action for action in parser._actions for opt in action.option_strings}


@pytest.mark.parametrize("name", sorted(n for n, p in SUBCOMMANDS.items() if "--model" in _options(p)))
def test_every_command_that_loads_a_model_has_threads_auto(name):
    action = _options(SUBCOMMANDS[name]).get("--threads")
    assert action is not None and action.default == "auto", name
    assert "auto" in SUBCOMMANDS[name].format_help()


def test_the_demo_has_threads_auto():
    assert _options(SUBCOMMANDS["demo"])["--threads"].default == "auto"


@pytest.mark.parametrize("text,value", [("auto", "auto"), ("AUTO", "auto"), ("0", "0"), ("3", "3")])
def test_threads_values(text, value):
    assert runtime.parse_threads(text) == value


@pytest.mark.parametrize("text", ["-1", "x", "1.5", "", "4097", "1000000000", "²"])
def test_bad_threads_are_refused(text):
    with pytest.raises(UsageError, match="^threads: must be auto or a number"):  # the library's words, no flag
        runtime.parse_threads(text)


@pytest.mark.parametrize("busy,expected", [(0.0, 2), (0.4, 2), (0.9, 1), (1.0, 1), (2.0, 1), (5.0, 1)])
def test_auto_leaves_the_busy_cores(busy, expected):
    assert runtime.auto_threads(cores=[0, 1], busy=busy) == expected


def test_auto_shares_the_free_cores_among_local_ranks(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.auto_threads(cores=list(range(8)), busy=0.0) == 2
    assert runtime.auto_threads(cores=[0, 1], busy=0.0) == 1


def test_busy_cores_is_a_share_of_the_usable_cores():
    cores = runtime.usable_cores()
    assert cores and 0.0 <= runtime.busy_cores(cores, sample_seconds=0.05) <= len(cores)


def test_apply_threads_sets_torch_and_keeps_omp_num_threads_as_a_cap(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.apply_threads("1") == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.apply_threads("auto") == 1
        assert runtime.apply_threads("0") == torch.get_num_threads()  # torch's own: left as it is
    finally:
        torch.set_num_threads(before)


def test_a_bad_threads_value_is_one_line_and_exit_2():
    done = subprocess.run(landscape_cmd("fisher", "--threads", "many", "--out", "F.st"), env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--threads" in done.stderr
