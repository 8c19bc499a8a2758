"""Configuration types shared by every turboquant component.

One frozen dataclass (:class:`QuantizerConfig`) describes a quantizer completely;
it is hashable so it can key caches of codebooks and rotations, and it is what
gets written into saved files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

FORMAT_VERSION = 1
MIN_BITS = 1
MAX_BITS = 8
MAX_DIM = 1 << 16
"""Largest supported vector dimension: a Haar rotation at this size is already a 16 GiB matrix."""
MAX_SEED = (1 << 64) - 1
"""Seeds are 64-bit (torch generators take at most 64 bits)."""


class TurboQuantError(ValueError):
    """Error raised for invalid input, configuration or files.

    Subclasses :class:`ValueError` so callers that catch ``ValueError`` keep working.
    """


class Rotation(str, Enum):
    """Random rotation applied before scalar quantization."""

    HAAR = "haar"
    """Dense Haar-random orthogonal matrix (QR of a seeded Gaussian matrix). O(d²) per vector."""
    HADAMARD = "hadamard"
    """Random signs + fast Walsh-Hadamard transforms on power-of-two blocks. O(d log d) per vector."""


class Variant(str, Enum):
    """Which TurboQuant estimator the codes serve."""

    MSE = "mse"
    """TurboQuant_mse (paper Algorithm 1): all bits spent on Lloyd-Max codes; minimal MSE, biased inner products."""
    PROD = "prod"
    """TurboQuant_prod (paper Algorithm 2): (b-1)-bit MSE codes + 1-bit QJL on the residual; unbiased inner products."""


class Backend(str, Enum):
    """Compute backend for kernels."""

    AUTO = "auto"
    """Triton on CUDA tensors when Triton is importable, torch otherwise."""
    TORCH = "torch"
    """Plain PyTorch reference implementation (CPU or CUDA)."""
    TRITON = "triton"
    """Fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""


_NORM_DTYPES = ("float32", "float16", "bfloat16")


def _enum_value(enum_type: type[Enum], value: Any, field_name: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_type)  # type: ignore[attr-defined]
        raise TurboQuantError(f"{field_name}={value!r} is not supported; choose one of {allowed}") from None


@dataclass(frozen=True)
class QuantizerConfig:
    """Complete description of a TurboQuant quantizer.

    Args:
        dim: vector dimension ``d`` (≥ 2).
        bits: bits per coordinate, 1..8. Non-integer values (e.g. 2.5) split the
            rotated coordinates into a group at ``floor(bits)+1`` bits and one at
            ``floor(bits)`` bits (see :attr:`bit_split`).
        variant: ``"mse"`` or ``"prod"``.
        rotation: ``"hadamard"`` or ``"haar"``.
        seed: seed of the rotation (and of the QJL projection for ``prod``).
        norm_dtype: storage dtype of the per-vector norms.
        version: file-format version this config belongs to.

    Example:
        >>> QuantizerConfig(dim=128, bits=2.5).bit_split
        (32, 3, 96, 2)
    """

    dim: int
    bits: float
    variant: Variant = Variant.MSE
    rotation: Rotation = Rotation.HADAMARD
    seed: int = 0
    norm_dtype: str = "float32"
    version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise TurboQuantError(f"dim must be an int, got {type(self.dim).__name__}")
        if not 2 <= self.dim <= MAX_DIM:
            raise TurboQuantError(f"dim={self.dim} is not supported; dim must be in [2, {MAX_DIM}]")
        if (
            isinstance(self.bits, bool) or not isinstance(self.bits, (int, float))
            or (isinstance(self.bits, float) and not math.isfinite(self.bits))  # math.isfinite(10**400) overflows
        ):  # fmt: skip
            raise TurboQuantError(f"bits must be a finite number, got {self.bits!r}")
        if not (MIN_BITS <= self.bits <= MAX_BITS):
            raise TurboQuantError(f"bits={self.bits} is not supported; bits must be in [{MIN_BITS}, {MAX_BITS}]")
        object.__setattr__(self, "variant", _enum_value(Variant, self.variant, "variant"))
        object.__setattr__(self, "rotation", _enum_value(Rotation, self.rotation, "rotation"))
        if self.norm_dtype not in _NORM_DTYPES:
            raise TurboQuantError(f"norm_dtype={self.norm_dtype!r} is not supported; choose one of {_NORM_DTYPES}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TurboQuantError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.seed > MAX_SEED:
            raise TurboQuantError(f"seed={self.seed} is not supported; seed must fit in 64 bits (<= 2**64 - 1)")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TurboQuantError(f"version must be an int, got {self.version!r}")
        if self.version != FORMAT_VERSION:
            raise TurboQuantError(f"config version {self.version} is not supported (this library writes {FORMAT_VERSION})")
        n_hi, b_hi, _, b_lo = self.bit_split
        if self.variant is Variant.PROD and self.bits != int(self.bits) and b_lo < 1:
            raise TurboQuantError(f"prod variant with fractional bits={self.bits} needs bits >= 2")
        if n_hi and abs(self.effective_bits - self.bits) > 1e-9:
            raise TurboQuantError(
                f"bits={self.bits} cannot be realised exactly at dim={self.dim}: "
                f"{(self.bits - math.floor(self.bits)) * self.dim:g} high-precision coordinates is not an integer"
            )
        del b_hi

    @property
    def bit_split(self) -> tuple[int, int, int, int]:
        """``(n_hi, bits_hi, n_lo, bits_lo)`` of the MSE stage.

        For ``prod`` the MSE stage gets one bit less (``bits - 1``); ``bits_lo == 0``
        then means there is no MSE stage (pure QJL).
        """
        mse_bits = self.bits - 1 if self.variant is Variant.PROD else self.bits
        b_lo = int(math.floor(mse_bits))
        frac = mse_bits - b_lo
        n_hi = int(round(frac * self.dim))
        if n_hi == 0:
            return 0, b_lo + 1, self.dim, b_lo
        if n_hi == self.dim:
            return 0, b_lo + 2, self.dim, b_lo + 1
        return n_hi, b_lo + 1, self.dim - n_hi, b_lo

    @property
    def effective_bits(self) -> float:
        """Code bits per coordinate actually stored (QJL bit included, scalars excluded)."""
        n_hi, b_hi, n_lo, b_lo = self.bit_split
        qjl = 1 if self.variant is Variant.PROD else 0
        return (n_hi * b_hi + n_lo * b_lo) / self.dim + qjl

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (enums as their string values)."""
        out = asdict(self)
        out["variant"] = self.variant.value
        out["rotation"] = self.rotation.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantizerConfig":
        """Inverse of :meth:`to_dict`; unknown or missing fields raise :class:`TurboQuantError`."""
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - names
        if unknown:
            raise TurboQuantError(f"unknown config fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise TurboQuantError(f"invalid config {data!r}: {exc}") from None
