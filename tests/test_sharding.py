"""FSDP2 sharding (landscape.sharding) and the Fisher of a sharded model, on CPU with gloo, 2 ranks."""

import subprocess
import textwrap

import pytest
import torch
from conftest import _save_llama, landscape_cmd, subprocess_env, torchrun_cmd
from test_fisher import assert_same_fisher, small_batches

from landscape import sharding
from landscape.errors import UsageError
from landscape.fisher import compute_fisher, load_fisher
from landscape.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(*args, timeout=120):
    return subprocess.run(torchrun_cmd(*args), capture_output=True, text=True, timeout=timeout, env=subprocess_env())


@pytest.fixture(scope="module")
def tiny_llama_tied_dir(tmp_path_factory):
    """The tiny Llama with its output embedding tied to the input embedding."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    untied = _save_llama(tmp_path_factory.mktemp("llama_untied"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(untied, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("llama_tied")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(untied).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- one process
def test_unsharded_layout_and_tensors_are_plain():
    layout = sharding.shard_layout(1)
    assert (layout.shard_size, layout.n_groups, layout.group_index, layout.shard_rank) == (1, 1, 0, 0)
    assert layout.mesh is None and not layout.sharded
    model = torch.nn.Linear(3, 7)
    assert sharding.shard_model(model, layout) is model and not sharding.is_sharded(model.weight)
    assert sharding.local_rows(model.weight) == (0, 7) and sharding.local_rows(torch.zeros(())) == (0, 1)
    assert sharding.full_shape(model.weight) == (7, 3)
    assert sharding.local_tensor(model.weight).data_ptr() == model.weight.data_ptr()
    assert torch.equal(sharding.full_tensor(model.weight), model.weight.data)
    for bad in (0, 2):  # 2: a shard group needs torchrun
        with pytest.raises(UsageError, match="shard size"):
            sharding.shard_layout(bad)


# ----------------------------------------------------------------------------- two gloo ranks
API_WORKER = """
import torch
from landscape import sharding
from landscape.runtime import end_torchrun_process, join_torchrun, leave_torchrun

join_torchrun("cpu")
layout = sharding.shard_layout(2)
assert (layout.n_groups, layout.shard_size) == (1, 2) and layout.mesh is not None
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
whole = {n: p.detach().clone() for n, p in model.named_parameters()}
sharding.shard_model(model, layout)
weight = model[0].weight
assert sharding.is_sharded(weight) and sharding.full_shape(weight) == (7, 3)
rows = sharding.local_rows(weight)
assert rows == [(0, 4), (4, 7)][layout.shard_rank], rows  # torch.chunk: 4 + 3
assert torch.equal(sharding.local_tensor(weight), whole["0.weight"][rows[0]:rows[1]])
for name, p in model.named_parameters():
    assert torch.equal(sharding.full_tensor(p), whole[name]), name
local = torch.arange(rows[1] - rows[0], dtype=torch.float32) + rows[0]
assert torch.equal(sharding.full_tensor(sharding.sharded_like(local, model[0].bias)), torch.arange(7.0))
x = torch.ones(1, 3)
last_bias = sharding.full_tensor(model[2].bias)
sharding.local_tensor(weight).zero_()  # a write into the local rows is seen by the next forward
sharding.local_tensor(model[0].bias).zero_()
assert torch.equal(model(x), last_bias[None])
assert all(sharding.is_sharded(p) for p in model.parameters())  # resharded after the forward
print("ok")
leave_torchrun()
end_torchrun_process(0)  # gloo can abort at interpreter shutdown (see its docstring)
"""


@pytest.mark.distributed
def test_local_rows_and_full_tensor_on_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(API_WORKER))
    result = _torchrun(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok") == 2  # one per rank (their lines may interleave)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_llama_tied"])
def test_sharded_fisher_equals_single_process(name, request, tiny_corpus_file, tmp_path):
    model_dir = request.getfixturevalue(name + "_dir")
    out = tmp_path / "F.safetensors"
    result = _torchrun("-m", "landscape.cli", "fisher", "--model", model_dir, "--corpus", tiny_corpus_file,
                       "--max-samples", "7", "--seq-len", "16", "--batch-size", "3", "--device", "cpu",
                       "--quiet", "--shard-size", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    fisher, meta = load_fisher(out)
    assert meta["shard_size"] == "2" and meta["ranks"] == "2" and meta["samples"] == "7"
    loaded = load_model(str(model_dir))
    if name == "tiny_llama_tied":
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    expected = compute_fisher(loaded.model, small_batches(loaded, tiny_corpus_file, batch_size=7, max_samples=7),
                              kind=loaded.kind)
    # float32 gradients summed in another order (other batches, FSDP2's reduce-scatter): BERT's value
    # weights have measured 1.2e-6 of the tensor's largest value under load, so 1e-6 was a flake; a
    # wrong row, sample or rank is off by far more than 1e-5.
    assert_same_fisher(fisher, {k: v.double() for k, v in expected.items()}, rtol=1e-5)


RESUME_WORKER = """
import sys
import torch
from landscape import sharding
from landscape.data.corpus import load_batches
from landscape.fisher import compute_fisher
from landscape.models import load_model
from landscape.runtime import end_torchrun_process, join_torchrun, leave_torchrun

join_torchrun("cpu")
layout = sharding.shard_layout(2)
loaded = load_model(sys.argv[1])
sharding.shard_model(loaded.model, layout)
batches = load_batches(loaded, sys.argv[2], max_samples=8, seq_len=16, batch_size=2)
checkpoint = f"{sys.argv[3]}/F.rank{layout.shard_rank}.ckpt"
expected = compute_fisher(loaded.model, batches, layout=layout, kind=loaded.kind)

def interrupted():
    yield from batches[:2]
    raise KeyboardInterrupt

try:
    compute_fisher(loaded.model, interrupted(), checkpoint=checkpoint, layout=layout, kind=loaded.kind)
except KeyboardInterrupt:
    pass
forwards = []
handle = loaded.model.register_forward_hook(lambda *a: forwards.append(1))
resumed = compute_fisher(loaded.model, batches, checkpoint=checkpoint, layout=layout, kind=loaded.kind)
handle.remove()
assert len(forwards) == len(batches) - 2, forwards
for name, value in expected.items():
    assert sharding.full_shape(resumed[name]) == sharding.full_shape(value)
    assert torch.equal(sharding.local_tensor(resumed[name]), sharding.local_tensor(value)), name
print("ok")
leave_torchrun()
end_torchrun_process(0)  # gloo can abort at interpreter shutdown (see its docstring)
"""


@pytest.mark.distributed
def test_interrupted_sharded_run_resumes_from_per_rank_checkpoints(tiny_llama_dir, tiny_corpus_file, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(RESUME_WORKER))
    result = _torchrun(script, tiny_llama_dir, tiny_corpus_file, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok") == 2
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["F.rank0.ckpt", "F.rank1.ckpt"]


ERRORS_WORKER = """
import torch
from torch.distributed.tensor import DTensor, Shard
from landscape import sharding
from landscape.errors import UsageError
from landscape.runtime import end_torchrun_process, join_torchrun, leave_torchrun

join_torchrun("cpu")
layout = sharding.shard_layout(2)
# each rank reports to its own file: two ranks printing to one pipe interleave mid-line
report = open(f"{__file__}.rank{torch.distributed.get_rank()}", "w")


class Failing(torch.nn.Module):
    def __init__(self, error):
        super().__init__()
        self.linear, self.error = torch.nn.Linear(3, 4), error

    def forward(self, x):
        self.linear(x)  # its rows were gathered: a collective ran first
        raise self.error


for error in (ValueError("a bug in the model's forward"), torch.OutOfMemoryError("out of memory (2.00 GiB)")):
    model = sharding.shard_model(Failing(error), layout)
    try:
        with sharding.collective_errors():  # as compute_fisher runs its pass
            model(torch.ones(1, 3))
    except UsageError as err:
        raise SystemExit(f"reported as the backend's: {err}")
    except type(error) as err:
        assert err is error, err
        print("kept", type(err).__name__, file=report)
# gloo cannot send float8: a genuine failure of the backend, in a collective and in a pass
rows = DTensor.from_local(torch.zeros(2, 3, dtype=torch.float8_e4m3fn), layout.shard_mesh, [Shard(0)])
model = torch.nn.Linear(3, 4, bias=False).requires_grad_(False)
model.weight.data = model.weight.data.to(torch.float8_e4m3fn)
sharding.shard_model(model, layout)
for attempt in (lambda: sharding.full_tensor(rows), lambda: model(torch.ones(1, 3))):
    try:
        with sharding.collective_errors():
            attempt()
    except UsageError as err:
        assert str(err) == "FSDP2 sharding failed on this backend: Invalid scalar type", err
        assert isinstance(err.__cause__, RuntimeError), err.__cause__
        print("backend", file=report)
report.close()
leave_torchrun()
end_torchrun_process(0)  # gloo can abort at interpreter shutdown (see its docstring)
"""


@pytest.mark.distributed
def test_only_the_backend_s_own_failures_are_reported_as_the_backend_s(tmp_path):
    """A model's error and an out-of-memory error in a sharded pass stay what they are; a collective
    gloo cannot run (float8) is one UsageError that keeps its cause."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(ERRORS_WORKER))
    result = _torchrun(script)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        lines = (tmp_path / f"worker.py.rank{rank}").read_text().splitlines()
        assert lines == ["kept ValueError", "kept OutOfMemoryError", "backend", "backend"], (rank, lines)


@pytest.mark.distributed
def test_shard_size_that_does_not_divide_the_ranks_is_refused(tiny_gpt2_dir, tmp_path):
    """Each of the 2 ranks (started as torchrun starts them) says so in one line and exits 2."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [subprocess.Popen(landscape_cmd("fisher", "--model", tiny_gpt2_dir, "--device", "cpu", "--shard-size", 3,
                                            "--out", tmp_path / "F.safetensors"),
                              env=subprocess_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for rank in ranks:
        _, err = rank.communicate(timeout=120)
        assert rank.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "shard size of 3 does not divide the 2 ranks" in err
    assert not (tmp_path / "F.safetensors").exists()
