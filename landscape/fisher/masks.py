"""Element-wise masks from Fisher scores: top-K%, bottom-K% or a seeded random K% of the parameters.

The selection never holds a whole-model copy of the scores: the K-th value over all tensors is
found by a two-pass radix selection on order-preserving integer keys, reading the scores one
tensor (and one block) at a time, so the scores can stay in their file.  It selects exactly the
set a stable sort of the concatenated scores would (ties broken by position).  Memory: the masks
themselves (1 byte per parameter) and blocks of ``BLOCK_ELEMENTS``.
"""

from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from ..errors import UsageError
from ..progress import bar as progress_bar

MASK_KINDS = ("top", "bottom", "random")
BLOCK_ELEMENTS = 1 << 22
_DIGIT_BITS = 16  # two passes over 32-bit keys


def parse_mask_spec(spec: str) -> Tuple[str, float]:
    """'top:K' | 'bottom:K' | 'random:K' | 'all' -> (kind, K percent) with K in (0, 100]."""
    text = str(spec).strip().lower()
    if text == "all":
        return "all", 100.0
    kind, _, value = text.partition(":")
    if kind not in MASK_KINDS or not value:
        raise UsageError(f"mask spec '{spec}' is not top:K, bottom:K, random:K or all (K in percent)")
    try:
        percent = float(value)
    except ValueError:
        raise UsageError(f"mask spec '{spec}': K must be a number of percent in (0, 100]") from None
    if not 0.0 < percent <= 100.0:
        raise UsageError(f"mask spec '{spec}': K must be in (0, 100], got {value}")
    return kind, percent


def selected_count(percent: float, total: int) -> int:
    """How many of ``total`` elements K percent selects: round(K% · total), at least 1."""
    return min(total, max(1, round(percent / 100.0 * total)))


# ----------------------------------------------------------------------------- keys
def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2³²) with the same order.

    −0.0 and 0.0 get equal keys, as ``torch.kthvalue`` compares them.
    """
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), BLOCK_ELEMENTS):
        yield flat[start: start + BLOCK_ELEMENTS]


KeyStream = Callable[[], Iterable[torch.Tensor]]  # a fresh pass over the keys, in order


def kth_smallest_key(stream: KeyStream, rank: int) -> Tuple[int, int, int]:
    """The ``rank``-th smallest key (1-based) of a stream, by radix selection in two passes.

    Returns (key, number of keys smaller, number of keys equal).
    """
    prefix, below, equal = 0, 0, 0
    digits = 1 << _DIGIT_BITS
    for level, shift in enumerate((_DIGIT_BITS, 0)):
        hist = torch.zeros(digits, dtype=torch.int64)
        for keys in stream():
            if level:
                keys = keys[(keys >> _DIGIT_BITS) == prefix]
            hist += torch.bincount((keys >> shift) & (digits - 1), minlength=digits)
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(rank)))
        before = int(cumulative[digit - 1]) if digit else 0
        rank, below, equal = rank - before, below + before, int(hist[digit])
        prefix = (prefix << _DIGIT_BITS) | digit if level else digit
    return prefix, below, equal


# ----------------------------------------------------------------------------- scores
class ScoreSource:
    """Fisher scores read one tensor at a time: from a dict, or lazily from a safetensors file."""

    def __init__(self, scores):
        self._dict = scores if isinstance(scores, Mapping) else None
        self._path = None if self._dict is not None else str(scores)
        self.metadata = {}  # a file's header metadata (its provenance)
        if self._dict is not None:
            self.names = list(scores)
            self.shapes = {n: tuple(t.shape) for n, t in scores.items()}
        else:
            from safetensors import SafetensorError, safe_open

            try:
                handle = safe_open(self._path, framework="pt")
            except (SafetensorError, OSError, ValueError) as err:
                raise UsageError(f"'{self._path}' is not a Fisher file (safetensors): "
                                 f"{str(err).splitlines()[0]}") from None
            with handle:
                # The order load_file gives (the data's order), so masks equal those of the loaded dict.
                self.names = list(handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys())
                self.shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in self.names}
                self.metadata = dict(handle.metadata() or {})
            from .file import check_fisher_header

            check_fisher_header(self.metadata, self._path)

    def read(self, name: str) -> torch.Tensor:
        """float32 CPU scores of one tensor."""
        if self._dict is not None:
            return self._dict[name].detach().reshape(self.shapes[name]).float().cpu()
        from safetensors import safe_open

        from .file import check_fisher_tensor

        with safe_open(self._path, framework="pt") as handle:
            values = handle.get_tensor(name)
        check_fisher_tensor(name, values, self._path)  # what load_fisher checks, per tensor, before any cast
        return values.float()

    def shaped(self) -> Dict[str, torch.Tensor]:
        """{name: a meta tensor of the scores' shape}, to check names and shapes without values."""
        return {n: torch.empty(shape, device="meta") for n, shape in self.shapes.items()}

    def numel(self, name: str) -> int:
        """Number of scores (elements) of tensor ``name``."""
        size = 1
        for dim in self.shapes[name]:
            size *= dim
        return size


def _score_keys(source: ScoreSource, names: List[str], kind: str, seed: int) -> KeyStream:
    """A key stream over ``names`` in order.

    The keys are the scores (NaN last for top and bottom alike), or seeded uniform random keys for
    ``random`` (torch's CPU generator gives the same numbers in blocks as in one call, so the
    random keys equal those of one ``torch.rand`` over all).
    """
    if kind == "random":
        total = sum(source.numel(n) for n in names)

        def random_stream():
            generator = torch.Generator().manual_seed(int(seed))
            for start in range(0, total, BLOCK_ELEMENTS):
                yield sortable_keys(torch.rand(min(BLOCK_ELEMENTS, total - start), generator=generator))
        return random_stream

    nan = -float("inf") if kind == "top" else float("inf")

    def score_stream():
        for name in names:
            for block in _blocks(source.read(name)):
                yield sortable_keys(torch.nan_to_num(block, nan=nan))
    return score_stream


def _select_streamed(stream: KeyStream, kind: str, count: int, total: int) -> Iterator[torch.Tensor]:
    """Bool blocks, in stream order, with exactly ``count`` of ``total`` True.

    True marks the ``count`` highest keys for top (lowest for bottom), ties taken by position.
    """
    if count >= total:
        for keys in stream():
            yield torch.ones(keys.numel(), dtype=torch.bool)
        return
    rank = total - count + 1 if kind != "bottom" else count
    threshold, below, equal = kth_smallest_key(stream, rank)
    better = total - below - equal if kind != "bottom" else below
    ties_left = count - better
    for keys in stream():
        chosen = keys > threshold if kind != "bottom" else keys < threshold
        ties = torch.nonzero(keys == threshold).squeeze(1)
        chosen[ties[:ties_left]] = True
        ties_left -= min(ties_left, len(ties))
        yield chosen


def fisher_mask(scores, spec: str, seed: int = 0, granularity: str = "global",
                 names: Optional[List[str]] = None, progress: bool = False) -> Dict[str, torch.Tensor]:
    """Element-wise masks from Fisher scores: {param name: bool tensor shaped like the param}.

    Args:
        scores: {param name: tensor} or the path of a Fisher file (read one tensor at a time).
        spec: 'top:K' keeps the K% of elements with the highest scores, 'bottom:K' the K% lowest,
            'random:K' a seeded random K% (the same count, the paper's control), 'all' every one.
        seed: seed of the random keys.
        granularity: 'global' ranks all elements of all tensors together (exactly round(K%·N)
            selected, ties broken by position in the scores' order); 'tensor' selects K% inside
            each tensor (the paper code's way).
        names: the tensors that may be selected (e.g. the perturbable ones); others get all-False.
        progress: a progress bar (stderr) over the scores read, all passes together.

    Returns:
        {name: bool CPU tensor} for every tensor of ``scores``.  NaN scores are picked by top and
        bottom only when nothing else is left.

    Raises:
        UsageError: a malformed spec or granularity.
    """
    kind, percent = parse_mask_spec(spec)
    if granularity not in ("global", "tensor"):
        raise UsageError(f"unknown mask granularity '{granularity}'; use global or tensor")
    source = scores if isinstance(scores, ScoreSource) else ScoreSource(scores)
    allowed = None if names is None else set(names)
    chosen = [n for n in source.names if allowed is None or n in allowed]
    masks = {n: torch.zeros(source.shapes[n], dtype=torch.bool) for n in source.names}
    if kind == "all":
        for n in chosen:
            masks[n] = torch.ones(source.shapes[n], dtype=torch.bool)
        return masks
    if granularity == "global":
        groups = [chosen] if chosen else []
    else:
        groups = [[n] for n in chosen]
    generator = torch.Generator().manual_seed(int(seed))
    bar = _passes_bar(source, groups, percent, progress, f"mask {spec}")
    with bar:
        for group in groups:
            total = sum(source.numel(n) for n in group)
            count = selected_count(percent, total)
            if granularity == "tensor" and kind == "random":
                # One generator across tensors, in order, as the per-tensor masks always were.
                keys = sortable_keys(torch.rand(total, generator=generator))
                stream = lambda keys=keys: iter([keys])  # noqa: E731
            else:
                stream = _score_keys(source, group, kind, seed)
            stream = _counted(stream, bar)
            _fill(masks, source, group, _select_streamed(stream, "top" if kind == "random" else kind, count, total))
    return masks


def _passes_bar(source: ScoreSource, groups: List[List[str]], percent: float, show: bool, desc: str):
    """A tqdm bar over the elements the selection reads.

    3 passes (2 radix + 1 select) per group, 1 where everything is selected.
    """
    total = 0
    for group in groups:
        size = sum(source.numel(n) for n in group)
        total += size * (1 if selected_count(percent, size) >= size else 3)
    return progress_bar(total=total, desc=desc, unit="score", unit_scale=True, enabled=show)


def _counted(stream: KeyStream, bar) -> KeyStream:
    """``stream``, advancing ``bar`` by the keys of each block it yields."""
    def counted():
        for keys in stream():
            bar.update(keys.numel())
            yield keys
    return counted


def _fill(masks, source, group, blocks):
    """Write the streamed bool blocks into the masks of ``group``, in order."""
    buffered = torch.empty(0, dtype=torch.bool)
    stream = iter(blocks)
    for name in group:
        size = source.numel(name)
        parts, have = [buffered], buffered.numel()
        while have < size:
            block = next(stream)
            parts.append(block)
            have += block.numel()
        flat = torch.cat(parts)
        masks[name] = flat[:size].reshape(source.shapes[name]).clone()
        buffered = flat[size:]
