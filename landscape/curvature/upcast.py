"""The float32 copies of a low-precision model's weights, dropped while the second backward runs.

The Hessian's products run a bfloat16/float16 model in float32 (``operator._ModelState`` casts
its weights up, 4 bytes per parameter on top of the model's own 2).  Those copies are needed to
build the first-order graph (the forward and the first backward); the second backward reads the
weights only through the tensors that graph saved.  ``Upcast`` packs a saved tensor that is (a
view of) a float32 copy as a reference to the parameter instead, and unpacks it as a fresh
float32 copy of the original low-precision tensor, made when the backward op needs it and freed
after it: the same values bit for bit (float32 holds every bfloat16/float16 value exactly), so
the products are unchanged.  Between ``release`` and ``restore`` the parameters hold no values
(one zero, expanded to their shape), so only one layer's float32 weights exist at a time while
the second backward runs.

A parameter whose float32 copy was modified in place since it was made (its version counter
moved) is never referenced nor released: its values are not the original's any more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Ref:
    """A saved tensor that was a float32 copy (or a view of one): which copy, and the view's geometry."""

    index: int
    size: tuple
    stride: tuple
    offset: int


class Upcast:
    """Saved-tensor hooks and release/restore of the float32 copies that ``_ModelState`` made.

    Args:
        pairs: (parameter whose ``.data`` is now the float32 copy, the original low-precision
            tensor) for every cast parameter.
    """

    def __init__(self, pairs: list):
        self.params = [p for p, _ in pairs]
        self.originals = [d for _, d in pairs]
        self.versions = [p._version for p in self.params]
        self.pinned: set = set()  # indices of copies modified in place: kept, never referenced
        self.released: list = []  # indices whose parameter holds no values now
        self._index_storages()

    def _index_storages(self) -> None:
        self.storages = {p.untyped_storage().data_ptr(): i for i, p in enumerate(self.params)}

    def pack(self, t: torch.Tensor):
        """A saved tensor -> itself, or a ``_Ref`` when it lies in an unmodified float32 copy."""
        if self.released or t.dtype != torch.float32:
            return t
        try:
            index = self.storages.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return t
        if index is None:
            return t
        if self.params[index]._version != self.versions[index]:
            self.pinned.add(index)  # its values are not the original's: saved as is, never released
            return t
        return _Ref(index, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def unpack(self, packed):
        """``pack``'s result -> the tensor (a ``_Ref`` made again from the original, in float32)."""
        if not isinstance(packed, _Ref):
            return packed
        i = packed.index
        # Held: the copy itself (a first backward that saves it again saves a reference again).
        base = self._copy(i) if i in self.released else self.params[i].detach()
        return base.as_strided(packed.size, packed.stride, packed.offset)

    def _copy(self, index: int) -> torch.Tensor:
        # The call _ModelState made: the same layout, so a view's strides and offset still fit.
        return self.originals[index].float()

    def release(self) -> None:
        """Drop the float32 copies' values (the parameters keep their shape and dtype)."""
        if self.released:
            return
        for i, p in enumerate(self.params):
            if i not in self.pinned and p._version == self.versions[i]:
                p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
                self.released.append(i)

    def restore(self) -> None:
        """Make the released copies again (the parameters hold their float32 values again)."""
        for i in self.released:
            self.params[i].data = self._copy(i)
            self.versions[i] = self.params[i]._version
        if self.released:
            self.released = []
            self._index_storages()
