"""Launch parameters of the Triton kernels, as one frozen value passed to the wrappers.

Defaults are the best of the sweeps on an H200 (benchmarks/results/gpu_decode_h200.json, gpu_encode_h200.json,
docs/kernel_notes.md). Benchmarks sweep by passing ``dataclasses.replace(DEFAULT_TUNING, ...)``;
nothing is mutated globally.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import TurboQuantError


@dataclass(frozen=True)
class TritonTuning:
    """Block sizes, warps, stages and decoder choices of the decode-attention and encode kernels.

    Args:
        block_n: compressed tokens per inner step of the attention kernel.
        num_warps, num_stages: attention kernel launch (stages ≥ 2 pipeline the code loads).
        lut: code decoder: 0 shift/mask + centroid gather, 1 byte-indexed table (widths 1, 2, 4, 8),
            2 byte-permute register decoders (widths 2, 3, 4; others fall back to 1).
        dotk: decode 4-bit keys straight into the mma operand layout (no shared-memory trip).
        maxnreg: register cap per thread (0: none); applied for head_dim ≤ 128.
        width3_num_stages, width3_maxnreg: overrides when a 3-bit stream is present (its decode
            spills under the cap with two stages).
        precise: hi+lo fp16 split of q and p (≈ fp32) instead of one fp16 product each.
        prefetch: load tile i+1 while decoding tile i.
        programs_per_sm: flash-decoding splits so that ``B·Hkv·splits ≈ SMs × this``.
        max_block_m: largest query-row block (64 takes a wgmma path Triton 3.6 fails to lower).
        encode_block_t, encode_num_warps: encode kernel tokens per block and warps.
        encode_bucket: 0 compare-sum over boundaries, 1 binary search, 2 symmetric search on ``|y|``.
        encode_programs_per_sm: persistent encode programs per SM (0: one program per block).
        encode_dots: fp16 products of the encode rotation: 3 = hi·hi + hi·lo + lo·hi (≈ fp32), 2 drops
            the rounding of ``Πᵀ`` (hi·hi + lo·hi), 1 = one fp16 product (more codes differ from the
            fp32 reference near a boundary).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    lut: int = 2
    dotk: bool = True
    maxnreg: int = 96
    width3_num_stages: int = 1
    width3_maxnreg: int = 0
    precise: bool = False
    prefetch: bool = False
    programs_per_sm: int = 8
    max_block_m: int = 32
    encode_block_t: int = 64
    encode_num_warps: int = 4
    encode_bucket: int = 2
    encode_programs_per_sm: int = 4
    encode_dots: int = 2

    def __post_init__(self) -> None:
        for name in ("block_n", "num_warps", "num_stages", "programs_per_sm", "max_block_m", "encode_block_t", "encode_num_warps", "width3_num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TurboQuantError(f"TritonTuning.{name} must be a positive int, got {value!r}")
        for name in ("block_n", "max_block_m", "encode_block_t"):
            value = getattr(self, name)
            if value & (value - 1) or value < 16:
                raise TurboQuantError(f"TritonTuning.{name} must be a power of two >= 16, got {value}")
        for name, allowed in (("lut", (0, 1, 2)), ("encode_bucket", (0, 1, 2)), ("encode_dots", (1, 2, 3))):
            if getattr(self, name) not in allowed:
                raise TurboQuantError(f"TritonTuning.{name}={getattr(self, name)!r} is not supported; choose one of {allowed}")
        for name in ("maxnreg", "width3_maxnreg", "encode_programs_per_sm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TurboQuantError(f"TritonTuning.{name} must be a non-negative int, got {value!r}")

    def for_width3(self) -> TritonTuning:
        """This tuning with the overrides used when a 3-bit stream is present."""
        return replace(self, num_stages=self.width3_num_stages, maxnreg=self.width3_maxnreg)


DEFAULT_TUNING = TritonTuning()


@dataclass(frozen=True)
class CudaTuning:
    """Launch parameters of the warp-level CUDA decode kernel (kernels/cuda_attention.py).

    Args:
        variant: ``(warps, tiles, prefetch, decoder[, ctas])`` or None for the compiled default of the
            widths (8 warps × 2 tiles, the shared-memory table decoder, plain loads: a second register set
            and cp.async staging measured slower on an H200). prefetch: 0 none, 3 the next iteration's codes loaded into the one register set once this
            iteration's are decoded; decoder: 0 registers (prmt), 1 shared table, 2-6 mixes of the two
            (``cuda_attention.cu``'s ``key_table``; 3 and 5 in the sweep, the others in no build); ctas
            (default 0: the compiler's choice): CTAs per SM the kernel's registers are capped for. Variants
            other than the defaults exist only in ``-DTQ_TUNE`` builds, which a non-None variant triggers.
        waves: CTAs launched ≈ waves × (CTAs resident per SM × SMs).
        fused: merge the splits, rotate back, add the value offset and the full-precision window
            inside the decode kernel (last CTA per head); False uses the Triton combine kernel.
    """

    variant: tuple[int, ...] | None = None
    waves: int = 1
    fused: bool = True

    def __post_init__(self) -> None:
        if self.variant is not None:
            v = tuple(self.variant)
            if len(v) not in (4, 5) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
                raise TurboQuantError(
                    f"CudaTuning.variant must be (warps, tiles, prefetch, decoder[, ctas]) ints, got {self.variant!r}"
                )
            object.__setattr__(self, "variant", v if len(v) == 5 else (*v, 0))
        if isinstance(self.waves, bool) or not isinstance(self.waves, int) or self.waves < 1:
            raise TurboQuantError(f"CudaTuning.waves must be a positive int, got {self.waves!r}")
        if not isinstance(self.fused, bool):
            raise TurboQuantError(f"CudaTuning.fused must be a bool, got {self.fused!r}")


DEFAULT_CUDA_TUNING = CudaTuning()

__all__ = ["DEFAULT_CUDA_TUNING", "DEFAULT_TUNING", "CudaTuning", "TritonTuning"]
