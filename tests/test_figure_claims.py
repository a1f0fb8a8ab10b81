"""A figure carries the stamp of the claim its writer is given (an ``outputs.Claim`` object, passed as
``claim=``), not whatever this process last claimed at that path."""

import numpy as np
import pytest
import torch

from landscape import outputs
from landscape.guided import paucity, profile
from landscape.plots import surfaces as plots

pytestmark = pytest.mark.usefixtures("one_thread")


def _bowl(x, y):
    return 1.0 + x ** 2 + y ** 2


def _settings(path):
    return outputs.identify(path).stamp["settings"]


def test_each_writer_stamps_the_claim_it_is_given_in_every_format(write_surface, tmp_path):
    surface = write_surface("bowl.h5", _bowl, x=np.linspace(-1, 1, 5), y=np.linspace(-1, 1, 5))
    summary = [{"regularizer": "dropout", "metric": "accuracy", "fraction": f, "mean": 0.5, "q25": 0.4, "q75": 0.6}
               for f in (0.5, 1.0)]
    writers = {
        "s.png": lambda out, claim: plots.plot_surface(surface, out, kind="contour", claim=claim),
        "s.html": lambda out, claim: plots.plot_surface(surface, out, claim=claim),
        "c.pdf": lambda out, claim: plots.compare_surfaces([surface, surface], ["a", "b"], out, csv=False,
                                                           claim=claim),
        "p.svg": lambda out, claim: paucity.plot_paucity(summary, "accuracy", out, claim=claim),
    }
    for name, write in writers.items():
        out = tmp_path / name
        with outputs.claim_output(out, "figure", settings={"inputs": ["given"]}) as given:
            # A later claim of the same path in this process (re-entrant): the writer still stamps the
            # claim it is handed, which a lookup by path would not find.
            with outputs.claim_output(out, "figure", settings={"inputs": ["later"]}):
                write(out, given)
        assert _settings(out) == {"inputs": ["given"]}, name
        assert not outputs.lock_path(out).exists()


def test_a_claim_stamps_by_itself_and_a_figure_outside_any_claim_names_no_settings(tmp_path):
    out = tmp_path / "f.html"
    with outputs.claim_output(out, "figure", settings={"inputs": ["x"]}) as claim:
        assert claim.stamp == {"kind": "figure", "settings": {"inputs": ["x"]}}
        assert set(claim.figure_metadata("PNG")) == {"landscape-output"} and claim.figure_metadata("jpg") == {}
        out.write_text("<html><head></head><body></body></html>")
        claim.stamp_html(out)
    assert outputs.identify(out).stamp == {"kind": "figure", "settings": {"inputs": ["x"]}}
    with outputs.claim_output(tmp_path / "t.csv", "table") as table:
        assert table.stamp is None
    unclaimed = outputs.figure_metadata(out, "svg")  # released: nothing of the claim is left behind
    assert unclaimed == outputs.figure_metadata(tmp_path / "never.svg", "svg")
    assert outputs.UNCLAIMED == {"kind": "figure", "settings": None}


def test_a_profile_s_figures_carry_the_stamps_of_its_claims(tiny_bert, tmp_path):
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0))
              for n, p in tiny_bert.model.named_parameters()}
    folder = tmp_path / "prof"
    with profile.claim_profile(folder, tmp_path / "F.safetensors") as claims:
        assert sorted(claims.figures) == ["blocks.png", "parameters.png", "sites.png"]
        paths = profile.write_profile(fisher, tiny_bert.model, folder, claims=claims.figures)
    expected = {"command": "profile", "inputs": [str(tmp_path / "F.safetensors")]}
    assert all(_settings(paths[k]) == expected for k in ("parameters_png", "sites_png", "blocks_png"))
