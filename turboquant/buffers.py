"""Growable storage of codes: named tensors that grow together along one axis.

The KV cache grows ``[B, H, capacity, ...]`` buffers along the token axis (2) and the vector index
grows ``[capacity, ...]`` buffers along axis 0; both append in amortised O(1) (geometric growth,
never a per-token reallocation) and hand out views of the filled part.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class GrowableBuffer:
    """Named tensors sharing a length along ``axis``; ``view(name)`` is the filled part.

    Args:
        axis: the growing axis (0 for the index, 2 for the cache's ``[B, H, T, ...]``).
        min_capacity: smallest allocation once something is stored.

    Example:
        >>> buf = GrowableBuffer(axis=0)
        >>> buf.append({"codes": torch.zeros(3, 8, dtype=torch.uint8), "norms": torch.ones(3)})
        >>> buf.length, tuple(buf.view("codes").shape)
        (3, (3, 8))
    """

    def __init__(self, axis: int, min_capacity: int = 0) -> None:
        self.axis = axis
        self.min_capacity = min_capacity
        self.tensors: dict[str, torch.Tensor] = {}
        self.length = 0
        self.mapped = False  # tensors are a read-only memory map (copied before the first change)
        self._numpy: dict[str, np.ndarray] = {}

    @classmethod
    def wrap(cls, axis: int, tensors: dict[str, torch.Tensor], mapped: bool = False) -> GrowableBuffer:
        """A full buffer over existing tensors (e.g. loaded from a file), without copying them."""
        buf = cls(axis)
        buf.tensors = dict(tensors)
        buf.length = next(iter(tensors.values())).shape[axis] if tensors else 0
        buf.mapped = mapped
        return buf

    @property
    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[self.axis] if self.tensors else 0

    def view(self, name: str) -> torch.Tensor:
        """The filled part of tensor ``name``."""
        return self.tensors[name].narrow(self.axis, 0, self.length)

    def views(self) -> dict[str, torch.Tensor]:
        return {name: self.view(name) for name in self.tensors}

    def numpy(self, name: str) -> np.ndarray:
        """numpy view of the filled part (CPU), cached until the next change (converting costs ~20 µs)."""
        arr = self._numpy.get(name)
        if arr is None:
            arr = self._numpy[name] = self.view(name).numpy()
        return arr

    def reserve(self, need: int, templates: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]) -> None:
        """Make room for ``need`` entries; ``templates`` gives each tensor's shape (any size on ``axis``), dtype, device."""
        self._writable()
        if need <= self.capacity and set(templates) <= set(self.tensors):
            return
        new_cap = max(need, 2 * self.capacity, self.min_capacity)
        for name, (shape, dtype, device) in templates.items():
            full = list(shape)
            full[self.axis] = new_cap
            grown = torch.empty(full, dtype=dtype, device=device)
            if name in self.tensors and self.length:
                grown.narrow(self.axis, 0, self.length).copy_(self.view(name))
            self.tensors[name] = grown
        self._numpy.clear()

    def append(self, parts: dict[str, torch.Tensor]) -> None:
        """Append tensors of equal length along ``axis`` (one per name)."""
        if not parts:
            return
        count = next(iter(parts.values())).shape[self.axis]
        need = self.length + count
        self.reserve(need, {k: (tuple(t.shape), t.dtype, t.device) for k, t in parts.items()})
        for name, t in parts.items():
            self.tensors[name].narrow(self.axis, self.length, count).copy_(t)
        self.length = need
        self._numpy.clear()

    def advance(self, count: int) -> None:
        """Mark ``count`` more entries as filled (after writing them in place, e.g. by a kernel)."""
        if self.length + count > self.capacity:
            raise ValueError(f"advance({count}) beyond capacity {self.capacity} (length {self.length})")
        self.length += count
        self._numpy.clear()

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self._numpy.clear()

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor's filled part by ``fn(part)`` (batch reorder, selection, masks along ``axis``)."""
        self.tensors = {name: fn(self.view(name)) for name in self.tensors}
        self.length = next(iter(self.tensors.values())).shape[self.axis] if self.tensors else 0
        self.mapped = False
        self._numpy.clear()

    def _writable(self) -> None:
        if self.mapped:  # a read-only map is copied into RAM before the first change
            self.tensors = {name: self.view(name).clone() for name in self.tensors}
            self.mapped = False
            self._numpy.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part."""
        return sum(self.view(n).numel() * t.element_size() for n, t in self.tensors.items())

    @property
    def allocated(self) -> int:
        """Bytes allocated (growth slack included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


__all__ = ["GrowableBuffer"]
