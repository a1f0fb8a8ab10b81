"""Tiny models and corpora built inside the tests (no hub, no network).

Fixtures give both ``from_pretrained`` folders (to test loading) and loaded models.
"""

import json
import os
import random
import sys
from pathlib import Path

import pytest

# The suite never reaches the Hugging Face hub; say so before transformers reads it, so that a
# test asking for a hub id fails at once instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread unless the runner says otherwise: `--threads auto` picks fewer threads on a busy machine,
# and float sums in another order differ in the last bits, so a test comparing a file made now with
# one made earlier (bit for bit) must not depend on how busy the machine was in between.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

TEXT = """The river runs through the old town and under seven stone bridges.
Farmers bring apples, pears and cheese to the market every Saturday morning.
A small library near the station lends books, maps and records to anyone.
The orchestra played a long symphony while the audience listened in silence.
Engineers tested the new bridge with heavy trucks before it opened to traffic.
In winter the lake freezes and children skate on it after school.
The museum shows paintings, sculptures and letters from the last two centuries.
Scientists measured the temperature of the ocean at many depths during the voyage.
She wrote a letter to her brother who lived in a city by the sea.
The committee voted to build a new school next to the park.
Rain fell for three days and the roads near the river were closed.
The team won the final match after a long and difficult season.
""".strip().splitlines()

# Two separable "sentiment" classes of sentences for fine-tuning tests: label 1 and label 0.
POSITIVE = ["the market sells apples and cheese", "children skate on the lake",
            "the orchestra played a symphony", "the team won the final match"]
NEGATIVE = ["rain fell and the roads were closed", "the river runs under the bridges",
            "engineers tested the heavy trucks", "the committee voted to build a school"]


def write_toy_tsv(path, rows):
    """A TSV of ``rows`` labelled rows alternating 0/1, each a seeded choice from NEGATIVE/POSITIVE."""
    rng = random.Random(0)
    lines = ["text\tlabel"] + [f"{rng.choice(POSITIVE if i % 2 else NEGATIVE)}\t{i % 2}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXT * 3, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS_BERT))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _save_bert(path):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tok = BertTokenizerFast(tokenizer_object=_wordpiece_tokenizer(), unk_token="[UNK]", sep_token="[SEP]",
                            cls_token="[CLS]", pad_token="[PAD]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_gpt2(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _save_t5(path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    sentinels = [f"<extra_id_{i}>" for i in range(20)]
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXT * 3, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"] + sentinels))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=sentinels)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, decoder_start_token_id=fast.pad_token_id, pad_token_id=fast.pad_token_id,
                      eos_token_id=fast.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _save_llama(path):
    """A Llama-style causal LM whose tokenizer puts BOS before every text (as Llama 3 and Gemma do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, attention_dropout=0.1)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models on a shared 2-core machine: one thread avoids OpenMP spinning against other jobs, and
    matches the subprocesses that tests start with OMP_NUM_THREADS=1, so numbers compare bit for bit.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def headless_bert_dir(tmp_path_factory, tiny_bert_dir):
    """A bare ``BertModel`` (as sentence-transformers checkpoints are): no masked-LM head."""
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("headless_bert")
    BertModel.from_pretrained(tiny_bert_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """Folder of a tiny random BertForMaskedLM (2 layers, hidden 32) with a WordPiece tokenizer."""
    return _save_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def classifier_dir(tiny_bert_dir, tmp_path):
    """A 2-label sequence classifier made from the tiny BERT (a new, seeded head), as a folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from landscape.runtime import transformers_silenced

    torch.manual_seed(0)
    with transformers_silenced():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "clf")
    return tmp_path / "clf"


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """Folder of a tiny random GPT2LMHeadModel (tied embeddings, Conv1D layers) with a BPE tokenizer."""
    return _save_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """Folder of a tiny random T5ForConditionalGeneration with sentinel tokens."""
    return _save_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture
def tiny_bert(tiny_bert_dir):
    from landscape.models import load_model
    return load_model(str(tiny_bert_dir))


@pytest.fixture
def tiny_gpt2(tiny_gpt2_dir):
    from landscape.models import load_model
    return load_model(str(tiny_gpt2_dir))


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from landscape.models import load_model
    return load_model(str(tiny_llama_dir))


@pytest.fixture
def tiny_t5(tiny_t5_dir):
    from landscape.models import load_model
    return load_model(str(tiny_t5_dir))


@pytest.fixture(scope="session")
def tiny_corpus_file(tmp_path_factory):
    """A JSONL corpus of 12 short English documents."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT))
    return path


@pytest.fixture
def write_surface(tmp_path):
    """Factory: write a synthetic surface HDF5 file in the contract's layout (issue 4) and return its path.

    ``write_surface(name, f, x=..., y=None, legacy=False)``: ``f(X, Y)`` (or ``f(x)`` in 1D) gives the
    loss; ``legacy=True`` writes the original loss-landscape layout (shape (nx, ny), filled in
    meshgrid flat order, -1 for points not computed, ``dir_file`` as a dataset).
    """
    import h5py
    import numpy as np

    def write(name, f, x=np.linspace(-1, 1, 21), y=None, legacy=False, missing=None):
        path = tmp_path / name
        x = np.asarray(x, dtype=float)
        if y is None:
            z = np.asarray(f(x), dtype=float)
        else:
            y = np.asarray(y, dtype=float)
            z = np.asarray(f(*np.meshgrid(x, y)), dtype=float)  # (ny, nx)
        if missing is not None:
            z = np.where(missing(z), np.nan, z)
        with h5py.File(path, "w") as h5:
            h5["xcoordinates"] = x
            if y is not None:
                h5["ycoordinates"] = y
            if legacy:
                h5["dir_file"] = "model.t7_weights_xignore=biasbn_xnorm=filter.h5"
                stored = np.where(np.isnan(z), -1.0, z)
                if y is not None:
                    stored = stored.reshape(-1).reshape(len(x), len(y))
                h5["train_loss"] = stored
                h5["train_acc"] = np.where(stored < 0, -1.0, 50.0)
            else:
                h5.attrs["dir_file"] = "directions.h5"
                h5.attrs["norm"] = "filter"
                h5["train_loss"] = z
                h5["train_acc"] = np.where(np.isnan(z), np.nan, 0.5)
        return path

    return write


# ----------------------------------------------------------------------------- the command line in tests
ROOT = Path(__file__).resolve().parents[1]  # the checkout under test


def subprocess_env(**changes):
    """The environment of a process a test starts: this checkout first on its path, one thread, offline.

    One thread as in this process (``one_thread``), so files compare bit for bit; the checkout
    first, so the child imports the code under test and not whichever landscape is installed.

    Args:
        changes: variables to set (a str) or to remove (None).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


_RUNNING = {}  # the test being set up or run, for torchrun_cmd


def pytest_runtest_setup(item):
    _RUNNING["item"] = item


def torchrun_cmd(*args, ranks=2):
    """``torchrun --standalone --nproc-per-node RANKS ARGS`` (a script, or ``-m module ...``) as a command list.

    Only for a test marked ``distributed``: the fast tier (README) leaves those out, so a test
    that starts torchrun without the mark would slow every fast run down.
    """
    item = _RUNNING.get("item")
    if item is not None and item.get_closest_marker("distributed") is None:
        raise AssertionError(f"{item.nodeid} starts torchrun: mark it @pytest.mark.distributed")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            *map(str, args)]


def landscape_cmd(*args, ranks=1):
    """``landscape ARGS`` as a command list: one process, or ``ranks`` processes under torchrun."""
    cli = ["-m", "landscape.cli", *map(str, args)]
    return [sys.executable, *cli] if ranks == 1 else torchrun_cmd(*cli, ranks=ranks)


def cli_in_process(capfd, *args):
    """The command line in this process: (exit code, stdout, stderr) as the file descriptors saw them."""
    from landscape.cli import main

    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def shown_lines(err):
    """The non-empty lines of ``err`` as a terminal shows them (a progress bar's last state after \\r)."""
    return [part.rsplit("\r", 1)[-1] for part in err.split("\n") if part.rsplit("\r", 1)[-1].strip()]


def one_line(code, err, *words):
    """Exit 2, no traceback, one line on stderr that holds every one of ``words``; returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = shown_lines(err)
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def ctrl_c_as_in_a_terminal():
    """``preexec_fn`` for a child that a test interrupts with SIGINT: SIGINT at its default action.

    A test run started in the background by a non-interactive shell (``pytest ... &``) ignores
    SIGINT, children inherit that, and Python then installs no KeyboardInterrupt: the child would
    run to the end and exit 0.  Ctrl-C from a terminal is what these tests mean.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)



def kill_when(proc, lines_in, path, limit=120):
    """SIGKILL ``proc`` once ``path`` holds ``lines_in`` lines (its journal has that many records).

    Fails if the process ended first (its stderr is shown): such a test would check nothing.
    """
    import signal
    import time

    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= lines_in:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
