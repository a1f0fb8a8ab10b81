#!/usr/bin/env python
"""Pretrain the embedded default model: a small BERT masked LM on the embedded corpus.

Seeded and reproducible on CPU. Reads ``data/corpus/{train,heldout}.jsonl`` (built by
``data/build_corpus.py``), trains a lowercase WordPiece tokenizer (train split only) and a
``BertForMaskedLM`` with dynamic 15% masking (80/10/10), evaluates the held-out MLM loss on
fixed (seeded) masks every ``--eval-every`` steps, stops at a plateau, at ``--max-steps`` or
at ``--time-budget-min``, and writes ``--out`` (default ``landscape/data/model``, the package
data): ``model.safetensors``,
``config.json``, tokenizer files, ``training_log.csv`` and a model card ``README.md`` whose
numbers are all measured by this script.

    python data/build_corpus.py && python data/pretrain.py
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import shlex
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ_LEN = 128
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- tokenizer
def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2,
                          prefix: str = "##") -> list[str]:
    """Deterministic WordPiece vocabulary (BPE-style merges, the algorithm of the `tokenizers`
    WordPiece trainer), with ties broken by the symbols themselves.

    The `tokenizers` trainer numbers the "##x" symbols in hash-map order, so equal-count merges
    are chosen differently from run to run; this learner is reproducible."""
    import heapq

    words = sorted(word_counts)
    symbols = [[w[0]] + [prefix + ch for ch in w[1:]] for w in words]
    counts = [word_counts[w] for w in words]
    alphabet = sorted({s for syms in symbols for s in syms})
    vocab = list(SPECIALS) + alphabet
    pair_count: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    seen = set(vocab)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        a, b = pair
        new = a + b[len(prefix):] if b.startswith(prefix) else a + b
        if new not in seen:
            vocab.append(new)
            seen.add(new)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            syms, c = symbols[i], counts[i]
            for p in zip(syms, syms[1:]):  # remove this word's pairs
                pair_count[p] -= c
                changed.add(p)
            merged, k = [], 0
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    merged.append(new)
                    k += 2
                else:
                    merged.append(syms[k])
                    k += 1
            symbols[i] = merged
            for p in zip(merged, merged[1:]):  # add them back
                pair_count[p] = pair_count.get(p, 0) + c
                where.setdefault(p, set()).add(i)
                changed.add(p)
        pair_count.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return vocab


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    word_counts: dict[str, int] = {}
    for text in texts:
        for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            word_counts[w] = word_counts.get(w, 0) + 1
    vocab = learn_wordpiece_vocab(word_counts, vocab_size)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=SEQ_LEN,
                             unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


# ----------------------------------------------------------------------------- data
def pack(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate documents (separated by [SEP]) and cut into [CLS] x_1..x_126 [SEP] rows.

    Returns input_ids (n, SEQ_LEN), attention_mask, and the number of text tokens."""
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    enc = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    stream: list[int] = []
    for ids in enc:
        if stream:
            stream.append(sep_id)
        stream.extend(ids)
    body = SEQ_LEN - 2
    rows, masks = [], []
    for s in range(0, len(stream), body):
        piece = stream[s:s + body]
        row = [cls_id] + piece + [sep_id]
        att = [1] * len(row) + [0] * (SEQ_LEN - len(row))
        rows.append(row + [pad_id] * (SEQ_LEN - len(row)))
        masks.append(att)
    n_text = sum(len(ids) for ids in enc)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long), n_text


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, gen: torch.Generator,
                prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `prob` of the non-special tokens; 80% [MASK], 10% random, 10% kept."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~special
    labels[~chosen] = -100
    r = torch.rand(ids.shape, generator=gen)
    to_mask = chosen & (r < 0.8)
    to_rand = chosen & (r >= 0.8) & (r < 0.9)
    ids[to_mask] = tokenizer.mask_token_id
    n_special = len(SPECIALS)
    rand_tokens = torch.randint(n_special, len(tokenizer), ids.shape, generator=gen)
    ids[to_rand] = rand_tokens[to_rand]
    return ids, labels


def special_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    return input_ids < len(SPECIALS)  # the five specials have ids 0..4


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_loss(model, ids, att, labels, batch_size: int = 128) -> float:
    """Token-weighted mean cross-entropy over the masked held-out tokens (full model forward)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        lab = labels[s:s + batch_size]
        n = int((lab != -100).sum())
        if n == 0:
            continue
        out = model(input_ids=ids[s:s + batch_size], attention_mask=att[s:s + batch_size], labels=lab)
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count


def unigram_baseline(train_ids: torch.Tensor, train_att: torch.Tensor, labels: torch.Tensor,
                     vocab_size: int) -> float:
    """Cross-entropy (nats) of the add-one-smoothed train unigram distribution of text tokens
    on the held-out masked target tokens."""
    toks = train_ids[(train_att == 1) & (train_ids >= len(SPECIALS))]
    counts = torch.bincount(toks, minlength=vocab_size).double()
    logp = torch.log((counts + 1.0) / (counts.sum() + vocab_size))
    targets = labels[labels != -100]
    return float(-logp[targets].mean())


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Pretrain the embedded default BERT masked LM.")
    ap.add_argument("--corpus", default=None,
                    help="folder with train.jsonl and heldout.jsonl (default: the embedded corpus, "
                         "extracted into the data home on first use)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "landscape", "data", "model"))
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-budget-min", type=float, default=60.0,
                    help="stop (and save the best model so far) after this many minutes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: 6%% of --max-steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--patience", type=int, default=3,
                    help="stop after this many evaluations without a >--min-rel-improvement gain")
    ap.add_argument("--min-rel-improvement", type=float, default=0.005)
    ap.add_argument("--no-save", action="store_true", help="timing trials: train, report, save nothing")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import tokenizers
    import transformers
    from transformers import BertConfig, BertForMaskedLM

    if args.corpus is None:
        from landscape.data.embedded_text import embedded_text

        args.corpus = str(embedded_text("train").parent)
    train_docs = read_jsonl(os.path.join(args.corpus, "train.jsonl"))
    held_docs = read_jsonl(os.path.join(args.corpus, "heldout.jsonl"))
    train_texts = [d["text"] for d in train_docs]
    held_texts = [d["text"] for d in held_docs]

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    vocab = len(tokenizer)
    tr_ids, tr_att, tr_ntok = pack(tokenizer, train_texts)
    he_ids, he_att, he_ntok = pack(tokenizer, held_texts)
    tr_special = special_mask(tr_ids, tokenizer)
    log(f"tokenizer: vocab {vocab}; train {len(train_docs)} docs, {tr_ntok} tokens, "
        f"{tr_ids.shape[0]} sequences; heldout {len(held_docs)} docs, {he_ntok} tokens, "
        f"{he_ids.shape[0]} sequences")

    # fixed held-out masks, the same at every evaluation
    held_gen = torch.Generator().manual_seed(args.seed + 1000)
    he_in, he_lab = mask_tokens(he_ids, special_mask(he_ids, tokenizer), tokenizer, held_gen)
    n_held_masked = int((he_lab != -100).sum())
    uni = unigram_baseline(tr_ids, tr_att, he_lab, vocab)
    log(f"heldout masked tokens {n_held_masked}; unigram baseline CE {uni:.4f} "
        f"(ppl {math.exp(uni):.1f})")

    config = BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=SEQ_LEN, type_vocab_size=2,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = BertForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters, {args.layers} layers")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.06 * args.max_steps))

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0 at max_steps
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    mask_gen = torch.Generator().manual_seed(args.seed + 1)
    shuffle_gen = torch.Generator().manual_seed(args.seed + 2)

    init_loss = heldout_loss(model, he_in, he_att, he_lab)
    log(f"step 0: heldout {init_loss:.4f}")
    history = [{"step": 0, "train_loss": "", "heldout_loss": round(init_loss, 6),
                "lr": 0.0, "elapsed_s": round(time.time() - t_start, 1)}]
    best = (init_loss, 0, copy.deepcopy(model.state_dict()))
    ref_loss, since_ref = init_loss, 0  # plateau: no >min_rel gain over `patience` evals
    stop_reason = "max-steps"
    order, pos = torch.randperm(tr_ids.shape[0], generator=shuffle_gen), 0
    run_loss, run_n = 0.0, 0
    model.train()
    t_train = time.time()
    step = 0
    while step < args.max_steps:
        if pos + args.batch_size > order.numel():
            order, pos = torch.randperm(tr_ids.shape[0], generator=shuffle_gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        inp, lab = mask_tokens(tr_ids[idx], tr_special[idx], tokenizer, mask_gen)
        hidden = model.bert(input_ids=inp, attention_mask=tr_att[idx]).last_hidden_state
        sel = lab != -100
        logits = model.cls(hidden[sel])  # MLM head only where there is a target (same loss)
        loss = torch.nn.functional.cross_entropy(logits, lab[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        run_loss += float(loss.detach())
        run_n += 1
        if step % 10 == 0 and step % args.eval_every != 0:
            el = time.time() - t_train
            log(f"step {step}: train {run_loss / run_n:.4f}  {el / step:.2f} s/step")
        over_time = (time.time() - t_start) / 60.0 > args.time_budget_min
        if step % args.eval_every == 0 or step == args.max_steps or over_time:
            h = heldout_loss(model, he_in, he_att, he_lab)
            el = time.time() - t_start
            history.append({"step": step, "train_loss": round(run_loss / run_n, 6),
                            "heldout_loss": round(h, 6), "lr": sched.get_last_lr()[0],
                            "elapsed_s": round(el, 1)})
            log(f"step {step}: train {run_loss / run_n:.4f}  heldout {h:.4f} "
                f"(ppl {math.exp(h):.1f})  lr {sched.get_last_lr()[0]:.2e}  "
                f"{(time.time() - t_train) / step:.2f} s/step  elapsed {el / 60:.1f} min")
            run_loss, run_n = 0.0, 0
            if h < best[0]:
                best = (h, step, copy.deepcopy(model.state_dict()))
            if h < ref_loss * (1.0 - args.min_rel_improvement):
                ref_loss, since_ref = h, 0
            else:
                since_ref += 1
                if since_ref >= args.patience:
                    stop_reason = (f"plateau (no held-out improvement > "
                                   f"{100 * args.min_rel_improvement:g}% in {args.patience} evaluations)")
                    break
            if over_time:
                stop_reason = f"time budget ({args.time_budget_min:g} min)"
                break
    train_wall = time.time() - t_train
    steps_done = step
    model.load_state_dict(best[2])
    final = heldout_loss(model, he_in, he_att, he_lab)
    log(f"stopped: {stop_reason} after {steps_done} steps; best step {best[1]}; "
        f"heldout {final:.4f} (ppl {math.exp(final):.2f}) vs unigram {uni:.4f} "
        f"(ppl {math.exp(uni):.1f}); {train_wall / max(1, steps_done):.2f} s/step")
    if args.no_save:
        return 0

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, "vocab.txt"), "w", encoding="utf-8") as f:  # for slow/older loaders
        vocab_map = tokenizer.get_vocab()
        f.writelines(t + "\n" for t in sorted(vocab_map, key=vocab_map.get))
    with open(os.path.join(args.out, "training_log.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train_loss", "heldout_loss", "lr", "elapsed_s"])
        w.writeheader()
        w.writerows(history)
    wall = time.time() - t_start
    size_mb = os.path.getsize(os.path.join(args.out, "model.safetensors")) / 1e6
    argv_used = sys.argv[1:] if argv is None else list(argv)
    cleaned, skip = [], False  # where the files go does not change them: leave --out out
    for a in argv_used:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            cleaned.append(a)
    argv_used = cleaned
    rel_script = os.path.relpath(os.path.abspath(__file__), os.getcwd())
    command = ("python data/build_corpus.py && python "
               + " ".join(shlex.quote(a) for a in [rel_script] + argv_used))
    cfg_keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "tie_word_embeddings"]
    cfg = {k: getattr(config, k) for k in cfg_keys}
    card = f"""---
language: en
license: mit
library_name: transformers
pipeline_tag: fill-mask
---
# landscape default model: a small BERT masked LM (embedded)

The default model of the `landscape` toolkit: a `BertForMaskedLM` pretrained from scratch on the
embedded corpus, small enough to commit and to run every stage of the toolkit on 2 CPU cores.
Every number below was written by `data/pretrain.py` from what it measured.

## Corpus

Built by `data/build_corpus.py` from the test data of the `gensim==4.4.0` wheel (fetched with
`pip download`, not installed; the text is not committed):

- `enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`: a shortened English
  Wikipedia dump, main-namespace articles without redirects, stripped of markup to plain prose
  (articles longer than ~2000 words split into paragraph groups);
- `lee_background.cor`: the Lee background corpus (news articles, one per line).

Seeded (seed 0) 95% / 5% split by article, stratified by source.

| split | documents | tokens (WordPiece, no specials) | sequences of {SEQ_LEN} |
|---|---|---|---|
| train | {len(train_docs)} | {tr_ntok} | {tr_ids.shape[0]} |
| heldout | {len(held_docs)} | {he_ntok} | {he_ids.shape[0]} |

## Tokenizer and model

Lowercase WordPiece tokenizer (vocabulary {vocab}) trained on the train split only; saved as a
`BertTokenizerFast`. Model: `BertForMaskedLM`, {n_params} parameters
({size_mb:.1f} MB float32 safetensors), config:

```json
{json.dumps(cfg, indent=2)}
```

## Training

- Documents concatenated (separated by `[SEP]`) and packed into `[CLS] … [SEP]` sequences of
  {SEQ_LEN} tokens; dynamic MLM masking, 15% of tokens (80% `[MASK]`, 10% random, 10% kept),
  seeded `torch.Generator`.
- AdamW (betas 0.9/0.98, eps 1e-6), peak lr {args.lr:g}, {warmup} warm-up steps then linear
  decay to 0 at step {args.max_steps}, weight decay {args.weight_decay:g} (not on biases and
  LayerNorm), gradient clipping 1.0, batch size {args.batch_size} sequences, seed {args.seed}.
- Held-out MLM loss evaluated every {args.eval_every} steps on fixed (seeded) masks.
- Stopped by: {stop_reason}, after {steps_done} steps
  ({steps_done * args.batch_size / tr_ids.shape[0]:.1f} epochs); the saved weights are those of
  step {best[1]}, the best held-out loss.
- Wall time {wall / 60:.1f} min in total ({train_wall / max(1, steps_done):.2f} s per training
  step), on CPU ({platform.machine()}), torch threads: {args.threads};
  torch {torch.__version__}, transformers {transformers.__version__}, tokenizers
  {tokenizers.__version__}.

## Held-out evaluation

Token-weighted mean cross-entropy over the {n_held_masked} masked held-out tokens (fixed masks),
in nats:

| | cross-entropy | perplexity |
|---|---|---|
| this model | {final:.4f} | {math.exp(final):.2f} |
| unigram baseline | {uni:.4f} | {math.exp(uni):.2f} |
| untrained model (step 0) | {init_loss:.4f} | {math.exp(init_loss):.2f} |

The unigram baseline predicts every masked token from the train-split unigram distribution of
text tokens with add-one smoothing over the whole vocabulary. The per-evaluation history is in
`training_log.csv`.

## Reproduce

```
{command}
```

Training is deterministic for a given seed, thread count and torch version, except that a run
stopped by the time budget depends on the machine's speed.
"""
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    log(f"wrote {args.out} (model.safetensors {size_mb:.1f} MB); total {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
