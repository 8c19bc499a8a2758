"""turboquant: calibration-free online vector quantization (Zandieh et al., arXiv 2504.19874)."""

from .config import Backend, QuantizerConfig, Rotation, TurboQuantError, Variant
from .quantizer import QJL, QuantizedVectors, TurboQuantizer, TurboQuantMSE, TurboQuantProd

__all__ = [
    "Backend",
    "QJL",
    "QuantizedVectors",
    "QuantizerConfig",
    "Rotation",
    "TurboQuantError",
    "TurboQuantMSE",
    "TurboQuantProd",
    "TurboQuantizer",
    "Variant",
]
__version__ = "0.1.0"
