"""What the benchmarks share: peak memory of a block of work."""

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
