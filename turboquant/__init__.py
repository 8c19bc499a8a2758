"""turboquant: calibration-free online vector quantization (Zandieh et al., arXiv 2504.19874).

The public surface: the quantizers, their configs, the KV cache, the vector index, file I/O and
the one error type. Everything else lives in submodules (``turboquant.codec`` defines the bytes
of a code; see docs/DESIGN.md for the module map).
"""

from .config import IndexConfig, KVCacheConfig, QuantizerConfig, TurboQuantError, __version__  # noqa: F401
from .quantizer import QJL, QuantizedVectors, TurboQuantMSE, TurboQuantProd


def __getattr__(name: str) -> object:
    # Lazy so that ``import turboquant`` needs neither transformers (cache), FAISS (index) nor safetensors.
    if name == "TurboQuantCache":
        from .cache import TurboQuantCache

        return TurboQuantCache
    if name == "TurboQuantIndex":
        from .index import TurboQuantIndex

        return TurboQuantIndex
    if name in ("save_codes", "load_codes"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'turboquant' has no attribute {name!r}")


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
