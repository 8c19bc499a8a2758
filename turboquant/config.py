"""Configuration types shared by every turboquant component.

One frozen dataclass (:class:`QuantizerConfig`) describes a quantizer completely;
it is hashable so it can key caches of codebooks and rotations, and it is what
gets written into saved files.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
"""The package version (``turboquant.__version__``)."""
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


class NormCorrection(str, Enum):
    """Which KV-cache tensors store ``‖x‖/‖ŷ‖`` instead of ``‖x‖`` (see :func:`turboquant.codec.reconstruction_norms`)."""

    NONE = ""
    """Store ``‖x‖``: each reconstruction is shorter than the vector by its own factor ``‖ŷ‖``."""
    KEYS = "k"
    """Keys only."""
    VALUES = "v"
    """Values only."""
    BOTH = "kv"
    """Keys and values (default: every decoded token keeps its norm; free)."""

    @property
    def keys(self) -> bool:
        return "k" in self.value

    @property
    def values(self) -> bool:
        return "v" in self.value


class Metric(str, Enum):
    """Similarity of a :class:`~turboquant.index.TurboQuantIndex`."""

    IP = "ip"
    """Inner product; scores descending."""
    COSINE = "cosine"
    """Cosine: vectors and queries are normalised; scores descending."""
    L2 = "l2"
    """Squared Euclidean distance; scores ascending (as FAISS ``IndexFlatL2``)."""


class Engine(str, Enum):
    """Search engine of a :class:`~turboquant.index.TurboQuantIndex`."""

    AUTO = "auto"
    """Fast-scan where it applies (CPU, FAISS importable, near-equal stored norms), else torch."""
    FASTSCAN = "fastscan"
    """FAISS fast-scan shortlist over the top code bits + exact re-rank from the codes (raises if impossible)."""
    TORCH = "torch"
    """Exact block decode + matmul over every stored vector (any device, any width)."""


class Backend(str, Enum):
    """Compute backend for kernels."""

    AUTO = "auto"
    """CPU tensors: the C kernel (``CPU``) for attention, torch for encode. CUDA tensors: the CUDA C++
    decode kernel when it builds (else Triton) for attention and Triton for encode, when Triton is
    importable; torch otherwise."""
    TORCH = "torch"
    """Plain PyTorch reference implementation (CPU or CUDA)."""
    TRITON = "triton"
    """Fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    CPU = "cpu"
    """C decode-attention kernel on CPU tensors (kernels/cpu_attention.py), built with the system C
    compiler at first use; inputs it does not cover (and a missing compiler) use the torch reference."""
    CUDA = "cuda"
    """Warp-level CUDA C++ decode attention compiled at first use (kernels/cuda_attention.py);
    inputs it does not cover, and encode, run the Triton kernels."""


_NORM_DTYPES = ("float32", "float16", "bfloat16")


def cache_dir() -> Path:
    """Where turboquant keeps what it builds once: compiled kernels, the converted demo model.

    ``$TURBOQUANT_CACHE_DIR`` if set, else ``~/.cache/turboquant``.
    """
    env = os.environ.get("TURBOQUANT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turboquant"


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
        (64, 3, 64, 2)
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


def _check_int(value: Any, name: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TurboQuantError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_bits(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TurboQuantError(f"{name} must be a finite number, got {value!r}")
    if not (MIN_BITS <= value <= MAX_BITS):
        raise TurboQuantError(f"{name}={value} is not supported; it must be in [{MIN_BITS}, {MAX_BITS}]")


def _check_norm_dtype(value: Any, name: str = "norm_dtype") -> None:
    if value not in _NORM_DTYPES:
        raise TurboQuantError(f"{name}={value!r} is not supported; choose one of {_NORM_DTYPES}")


def replace_fields(config: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace`` that names unknown fields in a :class:`TurboQuantError`."""
    from dataclasses import replace

    known = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TurboQuantError(f"unknown {type(config).__name__} fields {unknown}; known: {sorted(known)}")
    return replace(config, **overrides)


@dataclass(frozen=True)
class KVCacheConfig:
    """Settings of a :class:`~turboquant.cache.TurboQuantCache` (defaults measured, see README).

    Args:
        key_bits, value_bits: bits per coordinate (1..8, fractional allowed, e.g. 2.5).
        key_variant: ``"mse"`` (default: measured better in attention) or ``"prod"`` (QJL residual).
        window: recent tokens kept in full precision.
        flush_every: compress once the window exceeds ``window + flush_every`` tokens
            (amortises encode calls; the bound on full-precision tokens).
        sink_tokens: first tokens kept in full precision (attention sinks: nearly every query
            puts large weight on them, so their quantization error reaches every output).
        center_keys: subtract each head's mean key (of the tokens seen before the first
            compression) before quantizing; softmax is shift-invariant per query, so ``<q, μ>``
            is added back exactly. Protects models with large key biases (Qwen2-style).
        center_values: same for values (``μ_v`` re-added with the compressed softmax mass).
        key_outlier_ratio: calibration-free key smoothing, decided per layer and head from the same
            prompt tokens as the centering: a RoPE channel pair (``j``, ``j + d/2``) whose RMS over
            those (centered) keys exceeds ``key_outlier_ratio`` times the head's median pair RMS is
            divided by ``s = sqrt(RMS / median)`` before quantizing, and the query multiplied by
            ``s`` (exact: ``<Dq, D⁻¹k> = <q, k>``). This catches large key biases on channels that
            RoPE rotates (Qwen2-style biases away from the lowest frequencies), which a constant
            offset cannot remove. ``0`` disables. The default 8 leaves models without such channels
            untouched (SmolLM2-135M's largest ratio is 6.5, a Gemma-3-style model's 3.2;
            ``benchmarks/kv_families.py``).
        full_precision_layers: layer indices never compressed.
        norm_correction: which tensors store ``‖x‖/‖ŷ‖`` (:class:`NormCorrection`).
        rotation, seed: rotation of the quantizers (keys use ``seed``, values ``seed + 1``).
        norm_dtype: storage of per-token norms.
        backend: ``"auto"`` (GPU kernels on CUDA when available), ``"torch"``, ``"triton"``.
        chunk: compressed tokens decoded at a time by the torch path.
    """

    key_bits: float = 4
    value_bits: float = 4
    key_variant: Variant = Variant.MSE
    window: int = 128
    flush_every: int = 32
    sink_tokens: int = 16
    center_keys: bool = True
    center_values: bool = False
    key_outlier_ratio: float = 8.0
    full_precision_layers: tuple[int, ...] = field(default_factory=tuple)
    norm_correction: NormCorrection = NormCorrection.BOTH
    rotation: Rotation = Rotation.HADAMARD
    seed: int = 0
    norm_dtype: str = "float16"
    backend: Backend = Backend.AUTO
    chunk: int = 2048

    def __post_init__(self) -> None:
        _check_bits(self.key_bits, "key_bits")
        _check_bits(self.value_bits, "value_bits")
        object.__setattr__(self, "key_variant", _enum_value(Variant, self.key_variant, "key_variant"))
        object.__setattr__(self, "norm_correction", _enum_value(NormCorrection, self.norm_correction, "norm_correction"))
        object.__setattr__(self, "rotation", _enum_value(Rotation, self.rotation, "rotation"))
        object.__setattr__(self, "backend", _enum_value(Backend, self.backend, "backend"))
        for name in ("window", "flush_every", "sink_tokens", "seed"):
            _check_int(getattr(self, name), name)
        _check_int(self.chunk, "chunk", 1)
        if self.window + self.flush_every == 0:
            raise TurboQuantError("window + flush_every must be positive")
        for name in ("center_keys", "center_values"):
            if not isinstance(getattr(self, name), bool):
                raise TurboQuantError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.key_outlier_ratio, bool) or not isinstance(self.key_outlier_ratio, (int, float)) \
                or not (self.key_outlier_ratio == 0 or 1 < self.key_outlier_ratio < float("inf")):  # fmt: skip
            raise TurboQuantError(f"key_outlier_ratio must be 0 (off) or a finite number > 1, got {self.key_outlier_ratio!r}")
        _check_norm_dtype(self.norm_dtype)
        try:
            layers = tuple(sorted({int(i) for i in self.full_precision_layers}))
        except (TypeError, ValueError):
            raise TurboQuantError(f"full_precision_layers must be layer indices, got {self.full_precision_layers!r}") from None
        object.__setattr__(self, "full_precision_layers", layers)

    def quantizer_configs(self, head_dim: int) -> tuple[QuantizerConfig, QuantizerConfig]:
        """``(key_config, value_config)`` for a head dimension (validates the bit widths)."""
        key = QuantizerConfig(head_dim, self.key_bits, self.key_variant, self.rotation, self.seed, self.norm_dtype)
        value = QuantizerConfig(head_dim, self.value_bits, Variant.MSE, self.rotation, self.seed + 1, self.norm_dtype)
        return key, value


def cache_settings(cache_config: KVCacheConfig | None, overrides: dict[str, Any]) -> KVCacheConfig:
    """A cache's :class:`KVCacheConfig`: ``cache_config`` (default: the defaults) with ``overrides`` applied."""
    settings = cache_config or KVCacheConfig()
    if not isinstance(settings, KVCacheConfig):
        raise TurboQuantError(f"cache_config must be a KVCacheConfig, got {type(settings).__name__}")
    return replace_fields(settings, overrides) if overrides else settings


@dataclass(frozen=True)
class IndexConfig:
    """Settings of a :class:`~turboquant.index.TurboQuantIndex` (everything but the device).

    Args:
        dim: vector dimension.
        bits: bits per coordinate, 1..8 (fractional rates such as 2.5 allowed). At ``dim=384,
            bits=4`` a vector takes 192 code bytes + a 4-byte norm.
        metric: :class:`Metric`.
        rotation: ``"haar"`` (default here, unlike the quantizers and the KV cache). Embedding
            collections are encoded in large batches, where a dense ``d × d`` product is BLAS-fast,
            and embeddings are not always dense: on sparse or one-hot-like inputs at
            non-power-of-two dimensions the randomized Hadamard rotation's MSE is up to +62%
            higher than Haar's (``benchmarks/distortion.py``), while on dense data the two are
            equal. KV states are dense and encoded a few tokens at a time, so the cache keeps the
            O(d log d) Hadamard rotation.
        seed: rotation seed.
        norm_dtype: storage dtype of the norms (``"float16"`` saves 2 bytes per vector).
        engine: :class:`Engine`.
        correction: score with ``‖x‖·<Πq, ŷ>/‖ŷ‖`` (default) instead of ``‖x‖·<Πq, ŷ>``.
        search_threads: threads of the C fast scan (a batch splits over queries; a single query
            over vector ranges once it scans more than 32 MiB of codes); ``None`` =
            ``torch.get_num_threads()``, the library's thread policy. The FAISS fallback uses it
            as its shard count (``None`` = 1).
        scan_bits: bits per coordinate the fast-scan stage reads (1, 2 or 4); ``None`` (default):
            2, or 1 for 2-bit codes where the scan bytes it saves outweigh its longer shortlist
            (:func:`turboquant.kernels.cpu_scan.auto_scan_bits`, decided when the scan mirror is built).
    """

    dim: int
    bits: float
    metric: Metric = Metric.IP
    rotation: Rotation = Rotation.HAAR
    seed: int = 0
    norm_dtype: str = "float32"
    engine: Engine = Engine.AUTO
    correction: bool = True
    search_threads: int | None = None
    scan_bits: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", _enum_value(Metric, self.metric, "metric"))
        object.__setattr__(self, "rotation", _enum_value(Rotation, self.rotation, "rotation"))
        object.__setattr__(self, "engine", _enum_value(Engine, self.engine, "engine"))
        if not isinstance(self.correction, bool):
            raise TurboQuantError(f"correction must be a bool, got {self.correction!r}")
        if self.search_threads is not None:
            _check_int(self.search_threads, "search_threads", 1)
        if self.scan_bits is not None and (self.scan_bits not in (1, 2, 4) or isinstance(self.scan_bits, bool)):
            raise TurboQuantError(f"scan_bits={self.scan_bits!r} is not supported; choose 1, 2 or 4")
        self.quantizer  # validates dim, bits, seed, norm_dtype with the quantizer's messages

    @property
    def quantizer(self) -> QuantizerConfig:
        """The MSE quantizer the index stores codes with."""
        return QuantizerConfig(self.dim, self.bits, Variant.MSE, self.rotation, self.seed, self.norm_dtype)
