"""Checking and converting user arrays (torch or numpy) at the public entry points.

One place for the rules every entry point applies: supported dtypes, the expected last
dimension, finiteness, ids, and "numpy in → numpy out".
"""

from __future__ import annotations

import warnings
from typing import Any, Union

import numpy as np
import torch

from .config import TurboQuantError

ArrayLike = Union[torch.Tensor, np.ndarray]

_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_DTYPES = (np.float16, np.float32, np.float64)


def check_dtype(x: Any, name: str) -> bool:
    """Raise unless ``x`` is a float torch tensor or numpy array; returns whether it is numpy."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _NUMPY_DTYPES:
            raise TurboQuantError(f"{name} has unsupported numpy dtype {x.dtype}; use float16, float32 or float64")
        return True
    if isinstance(x, torch.Tensor):
        if x.dtype not in _TORCH_DTYPES:
            raise TurboQuantError(f"{name} has unsupported dtype {x.dtype}; use float16, bfloat16, float32 or float64")
        return False
    raise TurboQuantError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def as_tensor(x: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    """``(tensor, came_from_numpy)`` for a float array of any shape."""
    if check_dtype(x, name):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    return x, False  # type: ignore[return-value]


def check_vectors(x: torch.Tensor, dim: int, name: str) -> None:
    """Raise unless ``x`` is ``(..., dim)`` and finite."""
    if x.dim() == 0 or x.shape[-1] != dim:
        raise TurboQuantError(f"{name} must have last dimension {dim}, got shape {tuple(x.shape)}")
    # A NaN/Inf element makes the sum non-finite, so a finite sum (one fast reduction) proves
    # every element finite; only a sum that overflows needs the elementwise check.
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise TurboQuantError(f"{name} contains NaN or Inf")


def output(t: torch.Tensor, dtype: torch.dtype, numpy_io: bool) -> ArrayLike:
    """``t`` in ``dtype``, as numpy when the input was numpy."""
    t = t.to(dtype)
    return t.cpu().numpy() if numpy_io else t


def as_matrix(x: ArrayLike, dim: int, name: str) -> tuple[np.ndarray | torch.Tensor, bool]:
    """``(array (n, dim), numpy_io)``: a 1-D vector becomes one row; numpy stays numpy (cheap per call)."""
    numpy_io = check_dtype(x, name)
    t = x if numpy_io else x.detach()  # type: ignore[union-attr]
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != dim:
        raise TurboQuantError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
    return t, numpy_io


def to_torch(t: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of a numpy array (read-only arrays, e.g. ``np.load(mmap_mode="r")``, are never written)."""
    if isinstance(t, torch.Tensor):
        return t
    if not t.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(t))
    return torch.from_numpy(np.ascontiguousarray(t))


def to_numpy32(t: np.ndarray | torch.Tensor) -> np.ndarray:
    """Contiguous float32 numpy copy (or view) of an array."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().float().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def as_ids(ids: Any, n: int, name: str = "ids") -> np.ndarray:
    """``n`` non-negative int64 ids from any integer sequence."""
    arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    if arr.ndim != 1 or arr.shape[0] != n:
        raise TurboQuantError(f"{name} must be a 1-D sequence of {n} integers, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TurboQuantError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise TurboQuantError(f"{name} must fit in int64, got {arr.max()}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise TurboQuantError(f"{name} must be non-negative (-1 marks 'no result'), got {arr.min()}")
    return arr
