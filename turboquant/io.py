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
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

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
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


def load_tensors(path: str | os.PathLike[str], kind: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`save_tensors`; returns ``(tensors, header)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TurboQuantError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
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
    from .quantizer import code_bytes

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
