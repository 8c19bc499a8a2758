"""Saving and loading configs and codes: safetensors + a versioned, checksummed header.

Files are written atomically (a temporary file ``.NAME.PID.RANDOM.tmp`` in the target
directory, fsync, ``os.replace``, fsync of the directory), so a crash never leaves a
half-written file under the final name; the next successful save of the same name removes
temporaries that crashed savers left behind. Saved files get the mode a plain ``open()``
would give them (``0o666`` less the umask: 0644 under the usual umask 022).

Loading never executes code: safetensors holds raw tensors and the header is JSON. Every
field read from a file is range-checked before anything is allocated from it (the
safetensors table: lengths, dtypes, shapes, offsets; the turboquant header: format, version,
kind, config, counts vs tensor shapes), and two sha256 digests cover the tensors and the
header. Every problem — wrong format, unknown version, truncated or corrupt bytes, missing
tensors, out-of-range fields — raises :class:`~turboquant.config.TurboQuantError` naming the
file and the problem.

:func:`require_int`, :func:`require_bool`, :func:`require_choice`, :func:`require_tensor` and
:func:`config_from_header` are the checks :func:`load_codes` uses, for other loaders (the
index) to reuse on their own header fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import threading
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .codec import code_bytes
from .config import FORMAT_VERSION, QuantizerConfig, TurboQuantError, Variant
from .quantizer import QuantizedVectors

FORMAT_NAME = "turboquant"
_HEADER_KEY = "turboquant"
_HEADER_DIGEST = "header_checksum"
_LEGACY_KEYS = {"format", "version", "kind", "checksum", "config", "numpy_io", "index", "index_digest"}
_MAX_TABLE_BYTES = 100 << 20  # a safetensors JSON table larger than this is not one of ours
_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
              "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64}  # fmt: skip
_MAX_COUNT = 1 << 62  # vectors per file: far beyond any real file, small enough for int64 arithmetic


# --------------------------------------------------------------------------- digests


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # hash the (possibly memory-mapped) buffer in place: no copy
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def header_checksum(header: Mapping[str, Any]) -> str:
    """sha256 of the header's canonical JSON, without its own ``header_checksum`` field.

    The tensors checksum covers only tensor bytes; this one covers every header field (a flipped
    seed or dim in a codes file's config would otherwise load as different, valid-looking data).
    """
    body = {k: v for k, v in header.items() if k != _HEADER_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- field checks


def _where(path: str | os.PathLike[str], field: str) -> str:
    return f"{path}: header field {field!r}"


def require_int(path: str | os.PathLike[str], data: Mapping[str, Any], field: str, lo: int, hi: int) -> int:
    """``data[field]`` as an int in ``[lo, hi]`` (bools and floats rejected), else :class:`TurboQuantError`."""
    value = data.get(field) if isinstance(data, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TurboQuantError(f"{_where(path, field)} must be an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise TurboQuantError(f"{_where(path, field)} = {_short(value)} is out of range [{lo}, {hi}]")
    return value


def require_bool(path: str | os.PathLike[str], data: Mapping[str, Any], field: str) -> bool:
    """``data[field]``, which must be a JSON boolean."""
    value = data.get(field) if isinstance(data, Mapping) else None
    if not isinstance(value, bool):
        raise TurboQuantError(f"{_where(path, field)} must be true or false, got {_short(value)}")
    return value


def require_choice(path: str | os.PathLike[str], data: Mapping[str, Any], field: str, choices: Collection[Any]) -> Any:
    """``data[field]``, which must be one of ``choices``."""
    value = data.get(field) if isinstance(data, Mapping) else None
    if isinstance(value, bool) or value not in choices:
        raise TurboQuantError(f"{_where(path, field)} = {_short(value)} is not one of {sorted(choices)}")
    return value


def require_tensor(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """``tensors[name]``, which must exist with exactly this shape and dtype."""
    t = tensors.get(name)
    if t is None:
        raise TurboQuantError(f"{path}: tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise TurboQuantError(f"{path}: tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected {dtype}{tuple(shape)}")
    return t


def config_from_header(path: str | os.PathLike[str], data: Any) -> QuantizerConfig:
    """A :class:`QuantizerConfig` from a header's ``config`` object; every field range-checked
    (``QuantizerConfig.__post_init__``: dim, bits, seed within 64 bits, ...), errors naming the file."""
    if not isinstance(data, dict):
        raise TurboQuantError(f"{_where(path, 'config')} must be an object, got {_short(data)}")
    try:
        return QuantizerConfig.from_dict(data)
    except TurboQuantError as exc:
        raise TurboQuantError(f"{path}: invalid config: {exc}") from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(value))} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- saving


def _file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would create."""
    try:  # Linux: reading the umask without changing it (os.umask is not thread-safe)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


_UMASK_LOCK = threading.Lock()
_LIVE_TEMPS: set[str] = set()  # this process's temporaries still being written (other threads' saves)
_LIVE_LOCK = threading.Lock()


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{16}}\.tmp")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete temporaries of earlier saves of ``name`` whose writer is gone (killed mid-save).

    A temporary belongs to a live save if its process (the PID in its name) is running and, for
    this process, if it is still being written; those are left alone.
    """
    pattern = _temp_pattern(name)
    me = os.getpid()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    with _LIVE_LOCK:
        live = set(_LIVE_TEMPS)
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if (pid == me and entry.path not in live) or (pid != me and not _pid_alive(pid)):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another saver cleaned it first
            except OSError:
                pass  # cleanup is best effort; the save itself succeeded


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def _write_safetensors(fh: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream ``tensors`` (contiguous, CPU) to ``fh`` in the safetensors layout.

    Written here rather than with ``safetensors.torch.save_file``, which goes through a hidden
    ``.tmpXXXXXX`` file of its own in the target folder: a saver killed mid-write would leave that
    behind under a name this module cannot recognise as its own.
    """
    table: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise TurboQuantError(f"tensor {name!r} has dtype {t.dtype}, which the file format does not store")
        nbytes = t.numel() * t.element_size()
        table[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel():
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], kind: str, extra: dict[str, Any]) -> None:
    """Atomically write ``tensors`` with a header ``{format, version, kind, checksum, **extra, header_checksum}``.

    Raises :class:`TurboQuantError` naming ``path`` when its folder does not exist or cannot be
    written; the previous file under ``path`` (if any) is then untouched.
    """
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "checksum": tensors_checksum(cpu), **extra}
    header[_HEADER_DIGEST] = header_checksum(header)
    atomic_write(path, lambda fh: _write_safetensors(fh, cpu, {_HEADER_KEY: json.dumps(header)}))


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write a file through ``write(fh)`` atomically: a temporary in the same folder, fsync, rename.

    The file gets the mode ``open()`` would give it (the umask honoured); stale temporaries of the
    same name left by killed writers are removed afterwards; errors name ``path``, and the previous
    file under ``path`` (if any) is then untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TurboQuantError(f"cannot save {path}: folder {folder} does not exist")
    if path.is_dir():
        raise TurboQuantError(f"cannot save {path}: it is a folder")
    tmp = str(folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    with _LIVE_LOCK:
        _LIVE_TEMPS.add(tmp)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fchmod(fh.fileno(), _file_mode())
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            # I/O failures (no space, no permission, read-only folder) name the user's path, not the temporary
            if isinstance(exc, OSError):
                raise TurboQuantError(f"cannot save {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None
            if type(exc).__name__ == "SafetensorError":
                raise TurboQuantError(f"cannot save {path}: {exc}") from None
            raise
    finally:
        with _LIVE_LOCK:
            _LIVE_TEMPS.discard(tmp)
    _fsync_dir(folder)
    _remove_stale_temps(folder, path.name)


# --------------------------------------------------------------------------- loading


def _check_table(fh: Any, path: Path, size: int) -> tuple[dict[str, Any], dict[str, tuple[torch.dtype, list[int], int]]]:
    """Read and range-check the safetensors table of the open file ``fh`` before anything is
    allocated from it.

    Returns ``(metadata, {name: (dtype, shape, absolute byte offset)})``.
    """
    try:
        head = fh.read(8)
        if len(head) < 8:
            raise TurboQuantError(f"{path}: truncated ({size} bytes); not a turboquant file")
        hlen = int.from_bytes(head, "little")
        if hlen > min(size - 8, _MAX_TABLE_BYTES):
            raise TurboQuantError(f"{path}: header length {hlen} exceeds the file ({size} bytes); truncated or corrupt")
        raw = fh.read(hlen)
    except OSError as exc:
        raise TurboQuantError(f"{path}: cannot read: {os.strerror(exc.errno) if exc.errno else exc}") from None
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TurboQuantError(f"{path}: corrupt safetensors header; not a readable turboquant file") from None
    if not isinstance(table, dict):
        raise TurboQuantError(f"{path}: corrupt safetensors header; not a readable turboquant file")
    metadata = table.pop("__metadata__", None)
    if not isinstance(metadata, dict):
        raise TurboQuantError(f"{path}: missing turboquant header; not a turboquant file")
    data_bytes = size - 8 - hlen
    entries: dict[str, tuple[torch.dtype, list[int], int]] = {}
    spans = []
    for name, info in table.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TurboQuantError(f"{path}: tensor {_short(name)} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise TurboQuantError(f"{path}: tensor {_short(name)} has unsupported dtype {_short(dtype)}")
        if not isinstance(shape, list) or len(shape) > 8 or any(
            isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= _MAX_COUNT for s in shape
        ):
            raise TurboQuantError(f"{path}: tensor {_short(name)} has an invalid shape {_short(shape)}")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
        ):  # fmt: skip
            raise TurboQuantError(f"{path}: tensor {_short(name)} has invalid data offsets {_short(offsets)}")
        nbytes = torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()
        for s in shape:
            nbytes *= s
            if nbytes > data_bytes:
                break
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
            raise TurboQuantError(
                f"{path}: tensor {_short(name)} ({dtype}{tuple(shape)}) does not fit its data offsets "
                f"{_short(offsets)} in {data_bytes} data bytes; truncated or corrupt"
            )
        spans.append((begin, end))
        entries[name] = (_ST_DTYPES[dtype], shape, 8 + hlen + begin)
    spans.sort()
    if any(a_end > b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:])):
        raise TurboQuantError(f"{path}: tensors overlap; corrupt file")
    return metadata, entries


def _read_tensors(
    fh: Any, path: Path, entries: dict[str, tuple[torch.dtype, list[int], int]]
) -> dict[str, torch.Tensor]:
    """Tensors read from the same open file the table came from (a concurrent ``os.replace`` of
    ``path`` cannot mix two files: opening the path twice could)."""
    tensors = {}
    for name, (dtype, shape, start) in entries.items():
        count = 1
        for s in shape:
            count *= s
        buf = torch.empty(count * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8)
        fh.seek(start)
        if buf.numel() and fh.readinto(memoryview(buf.numpy())) != buf.numel():
            raise TurboQuantError(f"{path}: tensor {name!r} is truncated")
        tensors[name] = buf.view(dtype).reshape(shape)
    return tensors


def _map_tensors(fh: Any, entries: dict[str, tuple[torch.dtype, list[int], int]]) -> dict[str, torch.Tensor]:
    """Read-only memory maps of the tensors of the open file ``fh`` (its table already checked)."""
    tensors = {}
    for name, (dtype, shape, start) in entries.items():
        count = math.prod(shape)
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = np.memmap(fh, dtype=np.uint8, mode="r", offset=start, shape=(count * torch.empty((), dtype=dtype).element_size(),))
        with warnings.catch_warnings():  # read-only mapping; callers copy before writing
            warnings.simplefilter("ignore", UserWarning)
            tensors[name] = torch.from_numpy(raw).view(dtype).reshape(shape)
    return tensors


def verify_header(path: str | os.PathLike[str], metadata: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Parse and check the turboquant header in a safetensors ``__metadata__`` mapping.

    Checks format, version, kind, the tensors-checksum field's form and the header checksum
    (files written before the header checksum existed are accepted only with exactly the old
    fields). Returns the header; the caller still compares ``header["checksum"]`` with
    :func:`tensors_checksum` of what it loaded.
    """
    raw = metadata.get(_HEADER_KEY)
    if not isinstance(raw, str):
        raise TurboQuantError(f"{path}: missing turboquant header; not a turboquant file")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise TurboQuantError(f"{path}: corrupt turboquant header") from None
    if not isinstance(header, dict):
        raise TurboQuantError(f"{path}: corrupt turboquant header")
    if header.get("format") != FORMAT_NAME:
        raise TurboQuantError(f"{path}: format {_short(header.get('format'))} is not {FORMAT_NAME!r}")
    if isinstance(header.get("version"), bool) or header.get("version") != FORMAT_VERSION:
        raise TurboQuantError(f"{path}: format version {_short(header.get('version'))} is not supported (expected {FORMAT_VERSION})")
    if header.get("kind") != kind:
        raise TurboQuantError(f"{path}: holds {_short(header.get('kind'))}, expected {kind!r}")
    if _HEADER_DIGEST in header:
        if header[_HEADER_DIGEST] != header_checksum(header):
            raise TurboQuantError(f"{path}: header checksum mismatch; the file is corrupt")
    elif not set(header) <= _LEGACY_KEYS:
        raise TurboQuantError(f"{path}: header has unknown fields {_short(sorted(set(header) - _LEGACY_KEYS))}; corrupt file")
    checksum = header.get("checksum")
    if not isinstance(checksum, str) or not re.fullmatch(r"[0-9a-f]{64}", checksum):
        raise TurboQuantError(f"{path}: header field 'checksum' is malformed; the file is corrupt")
    return header


def load_tensors(
    path: str | os.PathLike[str], kind: str, device: str | torch.device = "cpu", *, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by :func:`save_tensors`; returns ``(tensors, header)``.

    With ``mmap=True`` the tensors are read-only memory maps of the file (CPU; nothing is copied
    until the caller writes); the checksum is verified either way, which reads the file once.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; everything is read from this one open file
    except FileNotFoundError:
        raise TurboQuantError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TurboQuantError(f"{path}: is a folder, not a turboquant file") from None
    except OSError as exc:
        raise TurboQuantError(f"{path}: cannot open: {os.strerror(exc.errno) if exc.errno else exc}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        metadata, entries = _check_table(fh, path, size)
        header = verify_header(path, metadata, kind)
        try:
            tensors = _map_tensors(fh, entries) if mmap else _read_tensors(fh, path, entries)
        except OSError as exc:
            raise TurboQuantError(f"{path}: cannot read: {os.strerror(exc.errno) if exc.errno else exc}") from None
    if str(device) != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    if tensors_checksum(tensors) != header["checksum"]:
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
    """Load codes saved by :func:`save_codes`, checking every shape and dtype against the stored config.

    Shapes: ``codes (*B, code_bytes)`` uint8, ``norms (*B,)``; for ``prod`` also
    ``qjl (*B, ceil(dim/8))`` uint8 and ``residual_norms (*B,)``, norms in ``config.norm_dtype``.
    """

    tensors, header = load_tensors(path, "codes", device)
    config = config_from_header(path, header.get("config"))
    numpy_io = header.get("numpy_io", False)
    if not isinstance(numpy_io, bool):
        raise TurboQuantError(f"{_where(path, 'numpy_io')} must be true or false, got {_short(numpy_io)}")
    prod = config.variant is Variant.PROD
    expected = {"codes", "norms"} | ({"qjl", "residual_norms"} if prod else set())
    if set(tensors) != expected:
        raise TurboQuantError(
            f"{path}: tensors {sorted(tensors)} do not match variant={config.variant.value} (expected {sorted(expected)})"
        )
    norm_dtype = getattr(torch, config.norm_dtype)
    norms = tensors["norms"]
    batch = tuple(norms.shape)
    require_tensor(path, tensors, "norms", batch, norm_dtype)
    codes = require_tensor(path, tensors, "codes", (*batch, code_bytes(config)), torch.uint8)
    qjl = residual_norms = None
    if prod:
        qjl = require_tensor(path, tensors, "qjl", (*batch, (config.dim + 7) // 8), torch.uint8)
        residual_norms = require_tensor(path, tensors, "residual_norms", batch, norm_dtype)
    return QuantizedVectors(config, codes, norms, qjl, residual_norms, numpy_io)


def save_config(path: str | os.PathLike[str], config: QuantizerConfig) -> None:
    """Save a quantizer configuration alone (the rotation and codebooks are rebuilt from it)."""
    save_tensors(path, {}, "config", {"config": config.to_dict()})


def load_config(path: str | os.PathLike[str]) -> QuantizerConfig:
    """Load a configuration saved by :func:`save_config`."""
    tensors, header = load_tensors(path, "config")
    if tensors:
        raise TurboQuantError(f"{path}: a config file holds no tensors, found {sorted(tensors)}")
    return config_from_header(path, header.get("config"))

