"""turboquant: calibration-free online vector quantization (Zandieh et al., arXiv 2504.19874)."""

from .config import Backend, QuantizerConfig, Rotation, TurboQuantError, Variant
from .quantizer import QJL, QuantizedVectors, TurboQuantizer, TurboQuantMSE, TurboQuantProd


def __getattr__(name: str) -> object:
    # Lazy so that ``import turboquant`` needs neither transformers (cache) nor FAISS (index).
    if name in ("TurboQuantCache", "KVCacheConfig"):
        from . import cache

        return getattr(cache, name)
    if name == "TurboQuantIndex":
        from .index import TurboQuantIndex

        return TurboQuantIndex
    raise AttributeError(f"module 'turboquant' has no attribute {name!r}")


__all__ = [
    "Backend",
    "KVCacheConfig",
    "QJL",
    "QuantizedVectors",
    "QuantizerConfig",
    "Rotation",
    "TurboQuantCache",
    "TurboQuantError",
    "TurboQuantIndex",
    "TurboQuantMSE",
    "TurboQuantProd",
    "TurboQuantizer",
    "Variant",
]
__version__ = "0.1.0"
