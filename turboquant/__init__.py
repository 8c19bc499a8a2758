"""turboquant: calibration-free online vector quantization (Zandieh et al., arXiv 2504.19874).

The public surface: the quantizers, their configs, the KV cache, the vector index, file I/O and
the one error type. Everything else lives in submodules (``turboquant.codec`` defines the bytes
of a code; see docs/DESIGN.md for the module map).
"""

from .config import IndexConfig, KVCacheConfig, QuantizerConfig, TurboQuantError, __version__  # noqa: F401

# Imported on first use: ``import turboquant`` (and ``turboquant --help``) needs no torch, the cache
# needs transformers only when used, the index FAISS only when used.
_LAZY = {
    "QJL": "quantizer",
    "QuantizedVectors": "quantizer",
    "TurboQuantMSE": "quantizer",
    "TurboQuantProd": "quantizer",
    "TurboQuantCache": "cache",
    "TurboQuantIndex": "index",
    "save_codes": "io",
    "load_codes": "io",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'turboquant' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "QJL",
    "IndexConfig",
    "KVCacheConfig",
    "QuantizedVectors",
    "QuantizerConfig",
    "TurboQuantCache",
    "TurboQuantError",
    "TurboQuantIndex",
    "TurboQuantMSE",
    "TurboQuantProd",
    "load_codes",
    "save_codes",
]
