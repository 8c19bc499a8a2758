"""The compiled CPU decode attention against the float64 reference and the torch reference.

``cpu_quantized_attention`` must match ``torch_quantized_attention`` (the specification) for
every input the latter accepts: widths 1..8 and fractional rates (AVX-512 planar path for 1/2/4
bits, the byte-table/bit-reader path otherwise), head dims 64/80/128/256, GQA groups 1..8,
boolean and additive masks (fully masked rows included), key/value offsets, an empty compressed
part or an empty window, several query positions, and the multi-threaded split.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from turboquant.config import QuantizerConfig, TurboQuantError
from turboquant.kernels import cpu_attention as ca
from turboquant.kernels.cpu_attention import cpu_quantized_attention
from turboquant.kernels.reference import torch_quantized_attention
from turboquant.kernels.testing import float64_attention, random_codes, relative_error
from turboquant.quantizer import TurboQuantizer

TOL = 1e-5
needs_kernel = pytest.mark.skipif(ca.load_library() is None, reason=f"no compiled kernel: {ca.library_error()}")


def make_case(d: int, bits: float, vbits: float | None = None, *, b: int = 1, hkv: int = 2, g: int = 3, l: int = 1,
              n: int = 300, w: int = 12, norm_dtype: str = "float16", mask: str | None = "bool", offsets: str = "k",
              seed: int = 0) -> tuple:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kcfg = QuantizerConfig(d, bits, seed=3, norm_dtype=norm_dtype)
    vcfg = QuantizerConfig(d, vbits if vbits is not None else bits, seed=4, norm_dtype=norm_dtype)
    keys = random_codes(kcfg, (b, hkv, n), "cpu", capacity=n + 17) if n else None
    values = random_codes(vcfg, (b, hkv, n), "cpu") if n else None
    q = torch.randn(b, hkv * g, l, d, generator=gen) * 2
    fk = torch.randn(b, hkv, w, d, generator=gen) if w else None
    fv = torch.randn(b, hkv, w, d, generator=gen) if w else None
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, l, n + w, generator=gen) > 0.25
    elif mask == "float":
        m = torch.randn(b, hkv * g, l, n + w, generator=gen)
        m = m.masked_fill(torch.rand(m.shape, generator=gen) < 0.2, float("-inf"))
    elif mask == "causal":  # decode rows of a causal chunk: row i sees columns < n + w - l + i + 1
        cols = torch.arange(n + w)
        rows = torch.arange(l).unsqueeze(-1) + (n + w - l)
        m = (cols <= rows)[None, None]
    ko = torch.randn(b, hkv, d, generator=gen) if "k" in offsets else None
    vo = torch.randn(b, hkv, d, generator=gen) if "v" in offsets else None
    return (q, keys, values, fk, fv, d**-0.5, m, ko, vo)


def check(args: tuple) -> torch.Tensor:
    out = cpu_quantized_attention(*args)
    ref64 = float64_attention(*args)
    ref = torch_quantized_attention(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert torch.isfinite(out).all()
    assert relative_error(out, ref64) < TOL
    assert relative_error(out, ref) < TOL
    return out


@needs_kernel
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 2.5, 3.5, 1.5])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_widths_and_dims(bits: float, d: int) -> None:
    check(make_case(d, bits, n=150, w=5))


@needs_kernel
@pytest.mark.parametrize("g", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_gqa_and_masks(g: int, mask: str | None) -> None:
    check(make_case(64, 4, 2, g=g, mask=mask, b=2, offsets="kv"))


@needs_kernel
@pytest.mark.parametrize("norm_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("offsets", ["", "k", "v", "kv"])
def test_norm_dtypes_and_offsets(norm_dtype: str, offsets: str) -> None:
    check(make_case(128, 4, norm_dtype=norm_dtype, offsets=offsets))


@needs_kernel
@pytest.mark.parametrize("l", [2, 5])
def test_several_query_positions(l: int) -> None:
    check(make_case(64, 4, 3, l=l, mask="causal"))


@needs_kernel
def test_empty_compressed_part_and_empty_window() -> None:
    check(make_case(64, 4, n=0, w=20))
    check(make_case(64, 4, n=200, w=0))
    check(make_case(80, 3, n=1, w=0, mask=None))


@needs_kernel
def test_fully_masked_rows_are_zero() -> None:
    args = list(make_case(64, 4, l=2, mask="bool"))
    m = args[6].clone()
    m[..., 0, :] = False  # the first query position sees nothing
    args[6] = m
    out = check(tuple(args))
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    # rows masked everywhere except the window: the compressed blocks contribute nothing
    m = torch.zeros_like(args[6])
    m[..., -3:] = True
    args[6] = m
    check(tuple(args))


@needs_kernel
def test_threaded_split_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca, "_THREAD_MIN_WORK", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        check(make_case(64, 4, n=2000, w=7, b=2, hkv=3))
        check(make_case(128, 3, n=777, w=0, g=1))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_long_history_block_merge() -> None:
    # many blocks with very different score ranges: the max rescaling of the merge must be exact
    args = list(make_case(64, 4, n=5 * ca.BLOCK + 3, w=4, hkv=1, g=2, mask="float"))
    args[6][..., : ca.BLOCK] += 30.0
    check(tuple(args))


@needs_kernel
def test_real_quantized_keys_and_dtype() -> None:
    torch.manual_seed(1)
    d = 64
    kq = TurboQuantizer.from_config(QuantizerConfig(d, 4, seed=0, norm_dtype="float16"))
    vq = TurboQuantizer.from_config(QuantizerConfig(d, 4, seed=1, norm_dtype="float16"))
    keys = kq.quantize(torch.randn(1, 3, 400, d) + 0.5)
    values = vq.quantize(torch.randn(1, 3, 400, d))
    q = torch.randn(1, 9, 1, d, dtype=torch.bfloat16)
    args = (q, keys, values, torch.randn(1, 3, 16, d), torch.randn(1, 3, 16, d), d**-0.5, None, None, None)
    out = cpu_quantized_attention(*args)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), float64_attention(*args)) < 1e-2  # bf16 output rounding


def test_fallbacks_equal_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # prod keys and many query rows use the reference itself (bit-identical)
    args = make_case(64, 3, 3, l=30, mask="causal")
    assert torch.equal(cpu_quantized_attention(*args), torch_quantized_attention(*args))
    q, keys, values, *rest = make_case(64, 3)
    prod = TurboQuantizer.from_config(QuantizerConfig(64, 3, variant="prod", seed=3, norm_dtype="float16"))
    pkeys = prod.quantize(torch.randn(1, 2, 300, 64))
    args = (q, pkeys, values, *rest)
    assert torch.equal(cpu_quantized_attention(*args), torch_quantized_attention(*args))
    # no compiler / TURBOQUANT_NO_CEXT=1
    monkeypatch.setattr(ca, "_lib", None)
    monkeypatch.setattr(ca, "_lib_error", "disabled for the test")
    args = make_case(64, 4)
    assert torch.equal(cpu_quantized_attention(*args), torch_quantized_attention(*args))


def test_errors() -> None:
    q, keys, values, fk, fv, s, m, ko, vo = make_case(64, 4)
    with pytest.raises(TurboQuantError, match="empty cache"):
        cpu_quantized_attention(q, None, None, None, None, s)
    with pytest.raises(TurboQuantError, match="not a multiple"):
        cpu_quantized_attention(q[:, :5], keys, values, fk, fv, s)
    with pytest.raises(TurboQuantError, match="mask covers"):
        cpu_quantized_attention(q, keys, values, fk, fv, s, m[..., 1:])


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_kernel_builds_here() -> None:
    # CI runs this image: the compiled path must be the one in use, not the fallback.
    assert ca.load_library() is not None, ca.library_error()
