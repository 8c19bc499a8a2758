"""TurboQuant quantizers: ``TurboQuantMSE``, ``TurboQuantProd`` and ``QJL``.

Thin classes over :mod:`turboquant.codec`, which owns the math and the bytes of a code: a
quantizer holds a config, checks and converts its inputs (torch or numpy, any leading shape)
and returns :class:`QuantizedVectors`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from .codec import decode_mse, encode, qjl_residual, qjl_scores
from .config import QuantizerConfig, Rotation, TurboQuantError, Variant
from .inputs import ArrayLike, as_tensor, check_vectors, output
from .rotation import RandomRotation, make_rotation, qjl_matrix


_SCORE_CHUNK = 8192  # stored vectors decoded at a time when scoring: bounds the temporary memory


# --------------------------------------------------------------------------- codes container


@dataclass
class QuantizedVectors:
    """Packed TurboQuant codes of a batch of vectors with leading shape ``B``.

    Attributes:
        config: the quantizer config that produced the codes.
        codes: ``(*B, code_bytes)`` uint8 Lloyd-Max codes (bit stream, docs/DESIGN.md);
            ``code_bytes`` is 0 for pure QJL.
        norms: ``(*B,)`` vector norms ``‖x‖`` in ``config.norm_dtype``.
        qjl: ``(*B, ceil(dim/8))`` uint8 residual sign bits (prod only).
        residual_norms: ``(*B,)`` ``‖x − x̂_mse‖`` in ``config.norm_dtype`` (prod only).
        numpy_io: whether the input was a numpy array (then outputs are numpy too).
    """

    config: QuantizerConfig
    codes: torch.Tensor
    norms: torch.Tensor
    qjl: torch.Tensor | None = None
    residual_norms: torch.Tensor | None = None
    numpy_io: bool = False

    @property
    def shape(self) -> torch.Size:
        """Leading (batch) shape ``B``."""
        return self.norms.shape

    def __len__(self) -> int:
        return self.norms.shape[0] if self.norms.dim() else 1

    @property
    def nbytes(self) -> int:
        """Exact storage of the codes and per-vector scalars, in bytes."""
        tensors = [self.codes, self.norms, self.qjl, self.residual_norms]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def device(self) -> torch.device:
        return self.norms.device

    def _map(self, fn: Any) -> "QuantizedVectors":
        return replace(
            self,
            codes=fn(self.codes),
            norms=fn(self.norms),
            qjl=None if self.qjl is None else fn(self.qjl),
            residual_norms=None if self.residual_norms is None else fn(self.residual_norms),
        )

    def __getitem__(self, index: Any) -> "QuantizedVectors":
        """Index the batch dims, e.g. ``codes[3:7]`` or ``codes[mask]``."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> "QuantizedVectors":
        return self._map(lambda t: t.to(device))

    def reshape(self, *shape: int) -> "QuantizedVectors":
        """Reshape the batch dims."""

        batch = torch.empty(self.shape, device="meta").reshape(*shape).shape  # resolves -1

        def fn(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch) if t.dim() == len(self.shape) else t.reshape(*batch, t.shape[-1])

        return self._map(fn)

    def flatten(self) -> "QuantizedVectors":
        return self.reshape(-1)

    @staticmethod
    def cat(parts: list["QuantizedVectors"], dim: int = 0) -> "QuantizedVectors":
        """Concatenate along batch dim ``dim`` (all parts from the same config)."""
        if not parts:
            raise TurboQuantError("cannot concatenate an empty list of QuantizedVectors")
        first = parts[0]
        if any(p.config != first.config for p in parts):
            raise TurboQuantError("cannot concatenate codes from different quantizer configs")

        def cat(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, dim=dim)

        return QuantizedVectors(first.config, cat("codes"), cat("norms"), cat("qjl"), cat("residual_norms"), first.numpy_io)  # type: ignore[arg-type]





# --------------------------------------------------------------------------- quantizers


class TurboQuantizer:
    """Base class: holds a :class:`QuantizerConfig`, its rotation and codebooks.

    Use :class:`TurboQuantMSE`, :class:`TurboQuantProd` or :class:`QJL`, or :meth:`from_config`.

    Args:
        dim: vector dimension ``d`` (≥ 2).
        bits: bits per coordinate, 1..8 (fractional rates such as 2.5 split the rotated coordinates).
        rotation: ``"hadamard"`` (default) or ``"haar"``.
        seed: seed of the rotation (and of the QJL projection).
        norm_dtype: storage dtype of the per-vector norms.
    """

    VARIANT: ClassVar[Variant]

    def __init__(
        self,
        dim: int,
        bits: float,
        rotation: Rotation | str = Rotation.HADAMARD,
        seed: int = 0,
        norm_dtype: str = "float32",
    ) -> None:
        if not hasattr(type(self), "VARIANT"):
            raise TurboQuantError("use TurboQuantMSE, TurboQuantProd, QJL or TurboQuantizer.from_config")
        self._setup(QuantizerConfig(dim, bits, self.VARIANT, rotation, seed, norm_dtype))  # type: ignore[arg-type]

    def _setup(self, config: QuantizerConfig) -> None:
        self.config = config
        self.rotation: RandomRotation = make_rotation(config.rotation, config.dim, config.seed)
        self._norm_dtype = getattr(torch, config.norm_dtype)

    @staticmethod
    def from_config(config: QuantizerConfig) -> "TurboQuantizer":
        """Build the quantizer class matching ``config.variant``."""
        cls = TurboQuantProd if config.variant is Variant.PROD else TurboQuantMSE
        quantizer = cls.__new__(cls)
        quantizer._setup(config)
        return quantizer

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def bits(self) -> float:
        return self.config.bits

    def __repr__(self) -> str:
        c = self.config
        return f"{type(self).__name__}(dim={c.dim}, bits={c.bits}, rotation={c.rotation.value!r}, seed={c.seed})"

    def rotate(self, x: ArrayLike) -> torch.Tensor:
        """Queries in the rotated domain, ``Π q`` (float32), for repeated scoring."""
        t, _ = as_tensor(x, "query")
        check_vectors(t, self.dim, "query")
        return self.rotation.rotate(t.float())

    def quantize(self, x: ArrayLike) -> QuantizedVectors:
        """Quantize vectors of any norm.

        Args:
            x: ``(*B, dim)`` torch tensor (CPU/CUDA; float16, bfloat16, float32, float64)
                or numpy array.

        Returns:
            :class:`QuantizedVectors` with batch shape ``B``.
        """
        t, numpy_io = as_tensor(x, "x")
        check_vectors(t, self.dim, "x")
        enc = encode(t.float(), self.config)
        stored_norms = enc.norms.to(self._norm_dtype)
        if not bool(torch.isfinite(stored_norms).all()):
            raise TurboQuantError(f"a vector norm overflows norm_dtype={self.config.norm_dtype}")
        residual_norms = None if enc.residual_norms is None else enc.residual_norms.to(self._norm_dtype)
        return QuantizedVectors(self.config, enc.codes, stored_norms, enc.qjl, residual_norms, numpy_io)

    def _check_codes(self, codes: QuantizedVectors) -> None:
        if not isinstance(codes, QuantizedVectors):
            raise TurboQuantError(f"expected QuantizedVectors, got {type(codes).__name__}")
        if codes.config != self.config:
            raise TurboQuantError(f"codes were made by {_describe(codes.config)}, not by this quantizer ({_describe(self.config)})")

    def dequantize_rotated(self, codes: QuantizedVectors) -> torch.Tensor:
        """Reconstruction in the rotated domain, ``Π x̂`` (float32, ``(*B, dim)``)."""
        self._check_codes(codes)
        y = decode_mse(codes.codes, self.config) * codes.norms.float().unsqueeze(-1)
        if self.config.variant is Variant.PROD:
            assert codes.qjl is not None and codes.residual_norms is not None
            y = y + qjl_residual(codes.qjl, codes.residual_norms, self.config)
        return y

    def dequantize(self, codes: QuantizedVectors, dtype: torch.dtype = torch.float32) -> ArrayLike:
        """Reconstruct ``x̂`` (``(*B, dim)``; numpy if the codes came from numpy)."""
        return output(self.rotation.unrotate(self.dequantize_rotated(codes)), dtype, codes.numpy_io)

    def inner_product(self, query: ArrayLike, codes: QuantizedVectors) -> ArrayLike:
        """Asymmetric estimate of ``<q, x>`` for every (query, stored vector) pair.

        The query is rotated once; stored vectors are never unrotated. For ``mse``
        this is ``‖x‖·<Πq, ŷ>`` (biased low by the codebook's shrinkage); for
        ``prod`` the QJL term makes it unbiased (paper Theorem 2).

        Args:
            query: ``(*Q, dim)``.
            codes: batch shape ``B``.

        Returns:
            ``(*Q, *B)`` float32 scores.
        """
        self._check_codes(codes)
        t, numpy_io = as_tensor(query, "query")
        check_vectors(t, self.dim, "query")
        q_rot = self.rotation.rotate(t.float().to(codes.device)).reshape(-1, self.dim)
        flat = codes.flatten()
        n = flat.norms.shape[0]
        out = torch.empty(q_rot.shape[0], n, dtype=torch.float32, device=q_rot.device)
        q_proj = None
        if self.config.variant is Variant.PROD:
            q_proj = q_rot @ qjl_matrix(self.dim, self.config.seed, q_rot.device).T
        for start in range(0, n, _SCORE_CHUNK):
            part = flat[start : start + _SCORE_CHUNK]
            scores = (q_rot @ decode_mse(part.codes, self.config).T) * part.norms.float()
            if q_proj is not None:
                assert part.qjl is not None and part.residual_norms is not None
                scores += qjl_scores(q_proj, part.qjl, part.residual_norms, self.config)
            out[:, start : start + part.norms.shape[0]] = scores
        out = out.reshape(*t.shape[:-1], *codes.shape)
        return out.cpu().numpy() if numpy_io else out


def _describe(config: QuantizerConfig) -> str:
    c = config
    return f"dim={c.dim}, bits={c.bits:g}, variant={c.variant.value}, rotation={c.rotation.value}, seed={c.seed}, norm_dtype={c.norm_dtype}"


class TurboQuantMSE(TurboQuantizer):
    """TurboQuant_mse (paper Algorithm 1): rotation + per-coordinate Lloyd-Max codes.

    Example:
        >>> q = TurboQuantMSE(dim=128, bits=4)
        >>> x = torch.randn(10, 128)
        >>> codes = q.quantize(x)
        >>> codes.nbytes  # 10 × (64 code bytes + 4-byte norm)
        680
        >>> x_hat = q.dequantize(codes)
    """

    VARIANT = Variant.MSE


class TurboQuantProd(TurboQuantizer):
    """TurboQuant_prod (paper Algorithm 2): ``bits−1`` MSE bits + 1-bit QJL on the residual.

    ``inner_product`` is an unbiased estimator of ``<q, x>`` (paper Theorem 2). ``bits=1`` is pure QJL.
    """

    VARIANT = Variant.PROD


class QJL(TurboQuantProd):
    """Quantized Johnson-Lindenstrauss (paper Definition 1): ``sign(S x)`` plus ``‖x‖``, 1 bit per coordinate."""

    def __init__(self, dim: int, seed: int = 0, norm_dtype: str = "float32") -> None:
        super().__init__(dim, 1, Rotation.HADAMARD, seed, norm_dtype)
