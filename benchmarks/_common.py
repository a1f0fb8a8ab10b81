"""What the benchmarks share: peak memory of a block of work, random BERT configs and batches."""

from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, peak RSS (VmHWM) on CPU."""

    def __init__(self, device):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_mb = int(line.split()[1]) / 1024
        return False


def random_mlm_batches(vocab, n_samples, seq_len, batch_size, device, seed=0):
    """Batches of random tokens with BERT-style 15% masked targets (for a random model)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_samples, batch_size):
        size = min(batch_size, n_samples - start)
        ids = torch.randint(5, vocab, (size, seq_len), generator=gen)
        targets = torch.rand(size, seq_len, generator=gen) < 0.15
        targets[:, 1] = True
        labels = torch.where(targets, ids, torch.full_like(ids, -100))
        inputs = torch.where(targets, torch.full_like(ids, 4), ids)
        out.append({"input_ids": inputs.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def random_bert_config(gpu_config):
    """(BertConfig, description): BERT-base for GPU runs, else the embedded model's shape."""
    from transformers import BertConfig

    if gpu_config:
        return BertConfig(), "random BERT-base-sized BertForMaskedLM"  # 12 layers, hidden 768
    config = BertConfig(vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128)
    return config, "random BertForMaskedLM shaped like the embedded model (data/model is absent)"
