"""How the GPU kernels see the packed code of :mod:`turboquant.codec`: column order, tables, rotations.

The bytes are defined once, in :func:`turboquant.codec.layout`; this module only derives what the
kernels need from it (no Triton import, so it is testable everywhere). A stream of width ``w`` is
unpacked into columns in natural coordinate order: widths dividing 8 as ``[bytes, codes per byte]``
and width 3 as ``[groups of 3 bytes, 8 codes]``, zero-padded to a power of two ≥ 16 columns
(``tl.dot``'s minimum).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from ..codebook import codebook_tensors
from ..codec import byte_table, layout
from ..config import QuantizerConfig, TurboQuantError, Variant
from ..rotation import make_rotation

SUPPORTED_WIDTHS = (1, 2, 3, 4, 8)


_SIDE = threading.local()


@lru_cache(maxsize=1)
def _side_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="turboquant-alloc")


def outside_graph_pool(device: torch.device, make: Callable[[], Any]) -> Any:
    """``make()`` (long-lived tensors: cached tables, rotations, counters) where no CUDA-graph pool takes them.

    CUDA-graph trees (``torch.compile(mode="reduce-overhead")``) run their warm-up call with the
    allocations of the calling thread going to the graph's private pool; a cache entry made there
    outlives the call and the trees refuse to record ("tensors in the cudagraph pool not tracked as
    outputs"). So on CUDA ``make`` runs on a side thread (its own current stream, no pool), which
    waits for its work before returning. Inside a capture nothing changes.
    """
    if device.type != "cuda" or getattr(_SIDE, "active", False) or torch.cuda.is_current_stream_capturing():
        return make()

    def run() -> Any:
        _SIDE.active = True
        with torch.cuda.device(device):
            out = make()
            torch.cuda.current_stream(device).synchronize()
        return out

    return _side_thread().submit(run).result()


def device_cached(maxsize: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``lru_cache`` for functions that build device tensors from hashable arguments (one of them a
    ``torch.device``): the tensors are made :func:`outside_graph_pool`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args: Any) -> Any:
            device = next((a for a in args if isinstance(a, torch.device)), torch.device("cpu"))
            return outside_graph_pool(device, lambda: fn(*args))

        return cached

    return wrap


def next_pow2(x: int) -> int:
    """Smallest power of two ≥ ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (int(x) - 1).bit_length())


class KernelStream(NamedTuple):
    """One code stream as a kernel reads it (width 0: absent)."""

    width: int
    count: int
    nbytes: int
    offset: int
    cols: int


_ABSENT = 16  # columns of an absent stream (never read)


@lru_cache(maxsize=512)
def stream_layout(config: QuantizerConfig) -> tuple[KernelStream, KernelStream]:
    """``(hi, lo)`` :class:`KernelStream` of ``config``'s codes; a missing high stream has width 0."""
    streams = layout(config).streams
    out = []
    for s in streams:
        cols = next_pow2(s.nbytes) * (8 // s.width) if 8 % s.width == 0 else next_pow2((s.count + 7) // 8) * 8
        out.append(KernelStream(s.width, s.count, s.nbytes, s.offset, max(16, cols)))
    if len(out) == 1:
        out.insert(0, KernelStream(0, 0, 0, 0, _ABSENT))
    if not out:
        out = [KernelStream(0, 0, 0, 0, _ABSENT)] * 2
    return out[0], out[1]


def config_supported(config: QuantizerConfig) -> bool:
    """MSE codes of widths the Triton kernels decode, ``dim >= 16``."""
    if config.variant is not Variant.MSE or config.dim < 16:
        return False
    hi, lo = stream_layout(config)
    return all(s.width in (0,) + SUPPORTED_WIDTHS for s in (hi, lo)) and lo.width != 0


@device_cached(maxsize=256)
def lookup_table(dim: int, width: int, lut: int, device: torch.device) -> torch.Tensor:
    """fp16 centroids (``lut=0``) or the byte-indexed table ``[slot, byte] → centroid`` (``lut=1``, flat)."""
    if lut == 1 and 8 % width == 0:
        return byte_table(dim, width, device, torch.float16).T.reshape(-1).contiguous()
    centroids, _ = codebook_tensors(dim, width, device)
    return centroids.to(torch.float16).contiguous()


def stream_table(config: QuantizerConfig, stream: KernelStream, lut: int, device: torch.device) -> torch.Tensor:
    """The table a kernel indexes for ``stream`` (decoder ``lut``; the register decoder reads it only when emulated)."""
    if stream.width == 0:
        return torch.zeros(16, dtype=torch.float16, device=device)
    return lookup_table(config.dim, stream.width, 0 if lut == 2 else lut, device)


@device_cached(maxsize=64)
def unrotation_blocks(config: QuantizerConfig, d_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``Π`` for each stream's columns, zero-padded: ``[cols_hi, d_out]``, ``[cols_lo, d_out]``."""
    pi = make_rotation(config.rotation, config.dim, config.seed).matrix(device)
    blocks = []
    start = 0
    for s in stream_layout(config):
        block = torch.zeros(s.cols, d_out, dtype=torch.float32, device=device)
        if s.width:
            block[: s.count, : config.dim] = pi[start : start + s.count]
            start += s.count
        blocks.append(block.contiguous())
    return blocks[0], blocks[1]


@device_cached(maxsize=64)
def query_rotation(config: QuantizerConfig, device: torch.device) -> torch.Tensor:
    """``[d, QC]``: ``q @ this`` is the rotated query ``Π q`` in the kernel's column order (zero pad columns)."""
    hi, lo = unrotation_blocks(config, config.dim, device)
    return torch.cat((hi, lo), dim=0).T.contiguous()


def expand_mask(mask: torch.Tensor, b: int, hq: int, l: int, t: int) -> torch.Tensor:
    """A mask as the GPU kernels read it: a broadcast view ``[B, Hq, L, T]`` (stride 0 where broadcast), booleans as uint8 bytes."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    try:
        return mask.expand(b, hq, l, t)
    except RuntimeError:
        raise TurboQuantError(f"mask of shape {tuple(mask.shape)} does not broadcast to {(b, hq, l, t)}") from None


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


__all__ = [
    "SUPPORTED_WIDTHS",
    "KernelStream",
    "config_supported",
    "expand_mask",
    "lookup_table",
    "next_pow2",
    "num_sms",
    "query_rotation",
    "stream_layout",
    "stream_table",
    "unrotation_blocks",
]
