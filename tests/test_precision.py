"""TF32 is a context of a stage: on while the stage works, and as it was before once the stage returns
(``runtime.precision_context``).  The switches are plain flags, so this runs on the CPU."""

import pytest
import torch

from landscape import runtime

pytestmark = pytest.mark.usefixtures("one_thread")


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_off():
    """Both switches off (a known state that tf32 must change), and torch's own state back afterwards."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_the_context_turns_tf32_on_inside_and_restores_after_an_error(tf32_off):
    with runtime.precision_context("tf32"):
        assert _flags() == (True, True)
    assert _flags() == (False, False)
    torch.set_float32_matmul_precision("medium")  # not a plain on/off: kept as it was too
    with pytest.raises(RuntimeError, match="inside"), runtime.precision_context("TF32"):
        raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == "medium" and not torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    for other in ("float32", "bfloat16", "float16", torch.float32):
        with runtime.precision_context(other):
            assert _flags() == (False, False)


def test_a_tf32_stage_computes_in_tf32_and_leaves_the_switches_as_it_found_them(
        tf32_off, tiny_bert_dir, tiny_corpus_file, tmp_path, monkeypatch):
    from landscape.fisher import load_fisher, run, run_fisher
    from landscape.settings import FisherSettings, ModelSpec, SampleSpec

    seen = []
    compute = run.compute_fisher

    def recording(*args, **kwargs):
        seen.append(_flags())
        return compute(*args, **kwargs)

    monkeypatch.setattr(run, "compute_fisher", recording)
    out = tmp_path / "F.safetensors"
    sample = SampleSpec(str(tiny_corpus_file), max_samples=2, seq_len=8, batch_size=2)
    run_fisher(FisherSettings(ModelSpec(str(tiny_bert_dir), dtype="tf32", device="cpu"), sample), out=out,
               progress=False)
    assert seen == [(True, True)]  # the work ran in TF32
    assert _flags() == (False, False)  # and the process is as it was
    assert load_fisher(out)[1]["dtype"] == "tf32"
    run_fisher(FisherSettings(ModelSpec(str(tiny_bert_dir), device="cpu"), sample), out=tmp_path / "G.safetensors",
               progress=False)
    assert seen[-1] == (False, False)  # a later float32 stage computes in float32
