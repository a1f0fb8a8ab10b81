"""How far apart are the two guided LoRA schedules of one adapter: from its base model's Fisher, or
from the adapter's own Fisher?  (issue 30; docs/finetune.md, "Guided LoRA dropout", says which to use.)

    python benchmarks/lora_schedule_agreement.py [--model BASE] [--adapter ADAPTER] [--out DIR]

Without ``--adapter`` one is trained here, as a user would with peft: LoRA r 8, alpha 16 on q_proj and
v_proj of a causal LM, AdamW at lr 1e-3 for ``--steps`` steps of 4 sequences of ``--train-seq-len`` tokens of
the embedded corpus's held-out text.
Both Fishers are computed on the same sample (``--max-samples`` sequences of ``--seq-len`` tokens of the
embedded corpus), both schedules with the defaults (linear, p 0.1 to 0), and compared site by site:
Spearman's rho of p (and of the scores), and the largest |p_base - p_adapter|.  Files are kept under
``--out`` (``base.safetensors``, ``adapter.safetensors``, ``adapter/``, ``from_base.json``,
``from_adapter.json``); a rerun reuses them.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def _train_adapter(base, folder: Path, steps: int, seq_len: int):
    """A LoRA adapter of ``base`` trained ``steps`` steps on held-out text (batch 4), saved to ``folder``."""
    import peft

    from landscape.data.corpus import load_batches
    from landscape.data.embedded_text import embedded_text
    from landscape.models import load_model

    loaded = load_model(base)
    model = peft.get_peft_model(loaded.model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                              lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    batches = load_batches(loaded, corpus=str(embedded_text("heldout")), max_samples=4 * steps, seq_len=seq_len,
                           batch_size=4, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    model.train()
    for step, batch in enumerate(batches[:steps]):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  step {step + 1}/{steps}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    model.save_pretrained(str(folder))


def _p(path: Path) -> dict:
    return {s["name"]: (s["p"], s["score"]) for s in json.loads(path.read_text())["sites"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the base model (default: SmolLM2-135M-Instruct's folder)")
    parser.add_argument("--adapter", default=None, help="a causal-LM LoRA adapter of it (default: train one)")
    parser.add_argument("--steps", type=int, default=8, help="training steps of the adapter made here")
    parser.add_argument("--train-seq-len", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--out", default="out/lora_schedule_agreement")
    args = parser.parse_args(argv)

    from landscape import FisherSettings, ScheduleSettings, run_fisher, run_schedule
    from landscape.fisher.stability import spearman
    from landscape.settings import ModelSpec, SampleSpec

    if args.model is None:
        from landscape.datahome import built_checkpoints

        args.model = str(built_checkpoints()["smollm2-135m-instruct"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else out / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        print(f"training a LoRA adapter of {args.model} ({args.steps} steps)", file=sys.stderr, flush=True)
        _train_adapter(args.model, adapter, args.steps, args.train_seq_len)
    sample = SampleSpec(max_samples=args.max_samples, seq_len=args.seq_len, batch_size=8)
    for name, model in (("base", args.model), ("adapter", str(adapter))):
        run_fisher(FisherSettings(ModelSpec(model, threads=args.threads), sample), out=out / f"{name}.safetensors")
    for name in ("base", "adapter"):
        run_schedule(ScheduleSettings(str(out / f"{name}.safetensors"), ModelSpec(str(adapter), threads=args.threads),
                                      lora=""), out=out / f"from_{name}.json")
    base, own = _p(out / "from_base.json"), _p(out / "from_adapter.json")
    names = sorted(base)
    assert names == sorted(own), "the two schedules name other sites"
    rho_p = spearman([base[n][0] for n in names], [own[n][0] for n in names])
    rho_score = spearman([base[n][1] for n in names], [own[n][1] for n in names])
    gap = max(abs(base[n][0] - own[n][0]) for n in names)
    print(f"{len(names)} LoRA sites of {adapter} ({args.max_samples} samples of {args.seq_len} tokens): "
          f"Spearman of p {rho_p:.4f}, of scores {rho_score:.4f}; max |p_base - p_adapter| {gap:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
