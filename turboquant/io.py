"""Saving and loading configs and codes: safetensors + a versioned, checksummed header.

Files are written atomically (a temporary file in the target directory, fsync,
then ``os.replace``), so a crash never leaves a half-written file under the
final name. Loading never executes code: safetensors holds raw tensors and the
header is JSON. Every problem — wrong format, unknown version, truncated or
corrupt bytes, missing tensors — raises :class:`~turboquant.config.TurboQuantError`
naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codec import code_bytes
from .config import FORMAT_VERSION, QuantizerConfig, TurboQuantError, Variant
from .quantizer import QuantizedVectors

FORMAT_NAME = "turboquant"
_HEADER_KEY = "turboquant"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # hash the (possibly memory-mapped) buffer in place: no copy
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], kind: str, extra: dict[str, Any]) -> None:
    """Atomically write ``tensors`` with a header ``{format, version, kind, checksum, **extra}``."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "checksum": tensors_checksum(cpu), **extra}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata={_HEADER_KEY: json.dumps(header)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(
    path: str | os.PathLike[str], kind: str, device: str | torch.device = "cpu", *, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`save_tensors`; returns ``(tensors, header)``.

    With ``mmap=True`` the tensors are read-only memory maps of the file (CPU; nothing is copied
    until the caller writes); the checksum is verified either way, which reads the file once.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TurboQuantError(f"{path}: no such file")
    try:
        if mmap:
            tensors, metadata = _map_tensors(path)
        else:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
            tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise TurboQuantError(f"{path}: not a readable turboquant file (truncated or corrupt): {exc}") from None
    if _HEADER_KEY not in metadata:
        raise TurboQuantError(f"{path}: missing turboquant header; not a turboquant file")
    try:
        header = json.loads(metadata[_HEADER_KEY])
    except json.JSONDecodeError:
        raise TurboQuantError(f"{path}: corrupt turboquant header") from None
    if header.get("format") != FORMAT_NAME:
        raise TurboQuantError(f"{path}: format {header.get('format')!r} is not {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION:
        raise TurboQuantError(f"{path}: format version {header.get('version')} is not supported (expected {FORMAT_VERSION})")
    if header.get("kind") != kind:
        raise TurboQuantError(f"{path}: holds {header.get('kind')!r}, expected {kind!r}")
    if tensors_checksum(tensors) != header.get("checksum"):
        raise TurboQuantError(f"{path}: checksum mismatch; the file is corrupt")
    return tensors, header


_ST_DTYPES = {"U8": (np.uint8, torch.uint8), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
              "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, torch.int64)}  # fmt: skip


def _map_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-map the tensors of a safetensors file (8-byte header length, JSON table, data)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        hlen = int.from_bytes(fh.read(8), "little")
        if hlen > size - 8:
            raise ValueError("header length beyond end of file")
        table = json.loads(fh.read(int(hlen)))
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a JSON object")
    tensors: dict[str, torch.Tensor] = {}
    for name, info in table.items():
        np_dtype, t_dtype = _ST_DTYPES[info["dtype"]]
        begin, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(v) for v in info["shape"])
        if any(v < 0 for v in shape) or begin < 0:
            raise ValueError(f"tensor {name!r} has a negative shape or offset")
        count = math.prod(shape)
        if 8 + hlen + end > size or end - begin != count * np.dtype(np_dtype).itemsize:
            raise ValueError(f"tensor {name!r} is truncated")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=t_dtype)
            continue
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=int(8 + hlen + begin), shape=shape)
        with warnings.catch_warnings():  # read-only mapping; callers copy before writing
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        tensors[name] = t.view(t_dtype) if t_dtype is torch.bfloat16 else t
    return tensors, metadata


def save_codes(path: str | os.PathLike[str], codes: QuantizedVectors) -> None:
    """Save :class:`QuantizedVectors` (with their quantizer config) to ``path``.

    Example:
        >>> q = TurboQuantMSE(64, 3)  # doctest: +SKIP
        >>> save_codes("x.tq", q.quantize(torch.randn(10, 64)))  # doctest: +SKIP
    """
    tensors = {"codes": codes.codes, "norms": codes.norms}
    if codes.qjl is not None and codes.residual_norms is not None:
        tensors["qjl"] = codes.qjl
        tensors["residual_norms"] = codes.residual_norms
    save_tensors(path, tensors, "codes", {"config": codes.config.to_dict(), "numpy_io": codes.numpy_io})


def load_codes(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> QuantizedVectors:
    """Load codes saved by :func:`save_codes`, checking shapes against the stored config."""
    tensors, header = load_tensors(path, "codes", device)
    config = QuantizerConfig.from_dict(header.get("config", {}))

    norms = tensors.get("norms")
    codes = tensors.get("codes")
    if norms is None or codes is None:
        raise TurboQuantError(f"{path}: missing 'codes' or 'norms' tensor")
    if codes.dtype != torch.uint8 or codes.shape != (*norms.shape, code_bytes(config)):
        raise TurboQuantError(f"{path}: codes of shape {tuple(codes.shape)} do not match config {config}")
    if str(norms.dtype) != f"torch.{config.norm_dtype}":
        raise TurboQuantError(f"{path}: norms dtype {norms.dtype} does not match config norm_dtype={config.norm_dtype}")
    qjl = tensors.get("qjl")
    residual_norms = tensors.get("residual_norms")
    if (config.variant is Variant.PROD) != (qjl is not None and residual_norms is not None):
        raise TurboQuantError(f"{path}: QJL tensors do not match variant={config.variant.value}")
    return QuantizedVectors(config, codes, norms, qjl, residual_norms, bool(header.get("numpy_io", False)))


def save_config(path: str | os.PathLike[str], config: QuantizerConfig) -> None:
    """Save a quantizer configuration alone (the rotation and codebooks are rebuilt from it)."""
    save_tensors(path, {}, "config", {"config": config.to_dict()})


def load_config(path: str | os.PathLike[str]) -> QuantizerConfig:
    """Load a configuration saved by :func:`save_config`."""
    _, header = load_tensors(path, "config")
    return QuantizerConfig.from_dict(header.get("config", {}))
