"""The CUDA encode kernel (turboquant/kernels/cuda_encode.py / .cu).

CPU tests (CI): the rotation in fragment order, its exactness in bf16, and the kernel's two
bucketize formulas emulated in float32 against ``torch.bucketize``. GPU tests (skipped without
CUDA + nvcc): codes and norms against :class:`TurboQuantizer` over widths, dims, input dtypes,
the fused offset/scale, the norm correction and the fallback.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant import QuantizerConfig
from turboquant.codebook import codebook_tensors
from turboquant.codec import code_bytes, decode_mse, reconstruction_norms
from turboquant.kernels import cuda_encode as ce
from turboquant.quantizer import TurboQuantizer
from turboquant.rotation import make_rotation

CUDA_OK = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
gpu = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU (sm_80+): the kernel is CUDA C++ built with nvcc")


# ---------------------------------------------------------------- CPU: layout and arithmetic


@pytest.mark.parametrize("d", [64, 128])
def test_orders_give_each_lane_its_chunks_and_one_output_slice(d: int) -> None:
    inp, out = ce.input_order(d), ce.output_order(d)
    assert sorted(inp.tolist()) == list(range(d)) and sorted(out.tolist()) == list(range(d))
    # B operand lane t (k index 2t, 2t+1, 2t+8, 2t+9 of every chunk) reads the 8-coordinate chunks at 32c + 8t,
    # its B words in order: word w (chunk k // 16, upper half) holds coordinates 32 (w // 4) + 8t + 2 (w % 4) + {0, 1}
    k = torch.arange(d)
    t = (k % 8) // 2
    assert (((inp % 32) // 8) == t).all()
    w = 2 * (k // 16) + (k % 16) // 8
    assert (inp == 32 * (w // 4) + 8 * t + 2 * (w % 4) + k % 2).all()
    # the four lanes of a token read 64 contiguous bytes (bf16) per 16-byte load instruction j
    for j in range(d // 32):
        chunk = torch.cat([inp[(w == 4 * j + q) & (t == tt)] for tt in range(4) for q in range(4)])
        assert sorted(chunk.tolist()) == list(range(32 * j, 32 * j + 32))
    # accumulator row g (and g + 8) of every m tile receives y[d/8·g, d/8·(g+1))
    assert ((out // (d // 8)) == (k % 8)).all()


@pytest.mark.parametrize("d,rotation", [(64, "hadamard"), (128, "hadamard"), (128, "haar"), (64, "haar")])
def test_fragments_hold_the_rotation(d: int, rotation: str) -> None:
    cfg = QuantizerConfig(d, 4, rotation=rotation, seed=3)
    frag = ce.rotation_fragments(cfg)
    pi = make_rotation(cfg.rotation, d, cfg.seed).matrix("cpu", torch.float64)
    if rotation == "hadamard":  # Π = H D₂ H D₁ / d has entries k/(d/2): exact in bf16, one part
        assert frag.shape[0] == 1
        assert (ce.fragments_to_matrix(frag[0], d).double() - pi).abs().max().item() < 1e-12
    else:
        assert frag.shape[0] == 2
        total = sum(ce.fragments_to_matrix(f, d).double() for f in frag)
        assert (total - pi).abs().max().item() <= 2.0**-16 * pi.abs().max().item()


def _emulate_table(y: np.ndarray, cfg: QuantizerConfig) -> np.ndarray:
    """``code_table`` of cuda_encode.cu: the cell of |y| from its float32 bits, one compare, the sign."""
    w = int(cfg.bits)
    base8, cells = ce.cell_table(cfg)
    y = y.astype(np.float32)
    row = np.maximum(ce.cell_key(y).astype(np.int64) - base8 // 8, 0)
    thr, code = cells[row, 0].view(np.float32), cells[row, 1].astype(np.int64)
    code = code + (np.abs(y) > thr)
    return np.where(np.signbit(y), code ^ ((1 << w) - 1), code)


def _emulate_words(y: np.ndarray, cfg: QuantizerConfig) -> np.ndarray:
    """``code_word`` of cuda_encode.cu (METHOD 2): the word of |y|'s key, the low 21 bits compared, the sign."""
    w = int(cfg.bits)
    words = ce.cell_words(cfg).astype(np.int64)
    u = y.astype(np.float32).view(np.uint32).astype(np.int64)
    e = words[(u >> 21) & 0x3FF]
    code = (e >> 24) + ((e & 0x1FFFFF) < (u & 0x1FFFFF))
    return np.where(np.signbit(y.astype(np.float32)), code ^ ((1 << w) - 1), code)


def _emulate_search(y: np.ndarray, cfg: QuantizerConfig) -> np.ndarray:
    """``code_alu`` of cuda_encode.cu: binary search of |y| over the positive boundaries, then the side."""
    w = int(cfg.bits)
    tab = ce.bucket_tables(cfg)
    h = 1 << (w - 1)
    pb = np.asarray(tab[: h - 1], dtype=np.float32)
    a = np.abs(y)
    lo, size = np.zeros(y.shape, dtype=np.int64), h
    while size > 1:  # the kernel's select tree, level by level
        size //= 2
        lo = np.where(a > pb[lo + size - 1], lo + size, lo)
    return np.where(y > np.float32(tab[7]), h + lo, h - 1 - lo)


def _boundary_values(bounds: np.ndarray) -> np.ndarray:
    """Every boundary, its float32 neighbours, zeros, extremes, tiny, huge and non-finite values."""
    b = bounds.astype(np.float32)
    extra = [0.0, 1.0, -1.0, 1e-30, -1e-30, 3e-39, 1.5, -1.9, 1e30, np.inf, -np.inf]
    return np.concatenate([b, np.nextafter(b, np.float32(2)), np.nextafter(b, np.float32(-2)), extra]).astype(np.float32)


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_bucketize_formulas_match_torch(w: int, d: int) -> None:
    cfg = QuantizerConfig(d, w)
    _, bounds = codebook_tensors(d, w)
    b = bounds.numpy()
    rng = np.random.default_rng(w * d)
    y = np.concatenate([(rng.standard_normal(50000) / np.sqrt(d)).astype(np.float32), _boundary_values(b)])
    want = torch.bucketize(torch.from_numpy(y), bounds).numpy()
    # |y| exactly on a boundary (y <= -b counts it in bucketize, |y| > b does not)
    tie = np.isin(np.abs(y), b[b > 0])
    assert (_emulate_search(y, cfg) == want)[~tie].all()
    # the table mirrors the middle boundary (0 up to the codebook's rounding, 7e-18 at d = 64):
    # negative y within it get the other code next to 0
    tie |= (y < 0) & (np.abs(y) <= abs(ce.bucket_tables(cfg)[7]))
    assert (_emulate_table(y, cfg) == want)[~tie].all()
    assert (_emulate_words(y, cfg) == want)[~tie].all()
    # and the two tables agree everywhere, ties included
    assert (_emulate_words(y, cfg) == _emulate_table(y, cfg)).all()


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-4.0, max_value=4.0, width=32), st.sampled_from([2, 3, 4]), st.sampled_from([64, 128]))
def test_table_bucketize_any_float(y: float, w: int, d: int) -> None:
    cfg = QuantizerConfig(d, w)
    _, bounds = codebook_tensors(d, w)
    arr = np.asarray([y], dtype=np.float32)
    if np.abs(arr[0]) in np.abs(bounds.numpy()) or (np.signbit(arr[0]) and abs(arr[0]) <= abs(ce.bucket_tables(cfg)[7])):
        return  # a tie, or a negative y within the middle boundary's rounding (-0.0 among them, never
        # produced by the product: its sums start at +0)
    want = torch.bucketize(torch.from_numpy(arr), bounds).numpy()
    assert _emulate_table(arr, cfg)[0] == want[0]
    assert _emulate_words(arr, cfg)[0] == want[0]


@pytest.mark.parametrize("d", [64, 128, 256])
def test_word_table_covers_every_float32_bit_pattern(d: int) -> None:
    """All 2^32 bit patterns, sampled by key: every word's low 21 bits are one boundary's or NO_BOUNDARY."""
    for w in (2, 3, 4):
        cfg = QuantizerConfig(d, w)
        words = ce.cell_words(cfg)
        low = words & ce.NO_BOUNDARY
        _, bounds = codebook_tensors(d, w)
        b = np.abs(bounds.numpy().astype(np.float32))
        assert np.isin(low[low != ce.NO_BOUNDARY], b.view(np.uint32) & ce.NO_BOUNDARY).all()
        assert (low != ce.NO_BOUNDARY).sum() == (1 << (w - 1))  # the middle boundary and h - 1 positive ones
        # the lowest and highest values of every key, both signs
        keys = np.arange(1024, dtype=np.uint32)
        y = np.concatenate([(keys << 21), (keys << 21) | 0x1FFFFF]).view(np.float32)
        y = np.concatenate([y, -y])
        fin = np.isfinite(y)
        want = torch.bucketize(torch.from_numpy(y[fin]), bounds).numpy()
        tie = np.isin(np.abs(y[fin]), b) | ((y[fin] <= 0) & (np.abs(y[fin]) <= abs(ce.bucket_tables(cfg)[7])))
        assert (_emulate_words(y[fin], cfg) == want)[~tie].all()


def test_cells_hold_at_most_one_boundary() -> None:
    for d in (64, 128):
        for w in (2, 3, 4):
            base8, cells = ce.cell_table(QuantizerConfig(d, w))
            assert cells.shape == (1024 - base8 // 8, 2)
            finite = np.isfinite(cells[:, 0].view(np.float32))
            assert finite.sum() == (1 << (w - 1)) - 1 + 1  # every positive boundary once, and the middle one


def test_unsupported_configs_are_not_claimed() -> None:
    x = torch.randn(2, 5, 96)
    cfg = QuantizerConfig(96, 4)
    codes = torch.zeros(2, 5, code_bytes(cfg), dtype=torch.uint8)
    assert not ce.cuda_encode_supports(x, cfg, codes, torch.zeros(2, 5))


def test_cpu_call_falls_back_to_the_quantizer() -> None:
    cfg = QuantizerConfig(64, 4, seed=2)
    x = torch.randn(3, 9, 64)
    off = torch.randn(3, 64)
    codes = torch.zeros(3, 12, code_bytes(cfg), dtype=torch.uint8)
    norms = torch.zeros(3, 12)
    out = ce.cuda_quantize_into(x, cfg, codes, norms, 2, offset=off, norm_correction=True)
    ref = TurboQuantizer.from_config(cfg).quantize(x - off.unsqueeze(1))
    assert torch.equal(out.codes, ref.codes)
    want = ref.norms / reconstruction_norms(decode_mse(ref.codes, cfg))
    torch.testing.assert_close(out.norms, want)


def test_operand_parts_by_input() -> None:
    cfg = QuantizerConfig(128, 4)  # Hadamard: Pi is one bf16 part
    big, small = ce.ROFF_MIN_TOKEN_ROWS, ce.ROFF_MIN_TOKEN_ROWS - 1
    assert ce._operand_parts(cfg, torch.bfloat16, False, False, small) == (1, 1)
    assert ce._operand_parts(cfg, torch.bfloat16, True, False, big) == (3, 1)  # one product, offset after it
    assert ce._operand_parts(cfg, torch.bfloat16, True, False, small) == (2, 1)  # few tokens: no host Pi mu
    assert ce._operand_parts(cfg, torch.bfloat16, True, True, big) == (2, 1)
    assert ce._operand_parts(cfg, torch.float32, False, False, big) == (2, 1)
    assert ce._operand_parts(QuantizerConfig(128, 4, rotation="haar"), torch.bfloat16, True, False, big) == (3, 2)


def test_rotated_offset_is_pi_times_the_offset() -> None:
    cfg = QuantizerConfig(64, 4, seed=5)
    off = torch.randn(3, 64)
    want = make_rotation(cfg.rotation, 64, cfg.seed).rotate(off.double()).float()  # the butterflies, not the matrix
    torch.testing.assert_close(ce.rotated_offset(off, cfg), want, rtol=1e-6, atol=1e-6)


def test_a_failed_build_warns_once_and_falls_back() -> None:
    """Both CUDA extensions share this loader (cuda_build.CudaExtension): the caller gets None and one warning."""
    from pathlib import Path

    from turboquant.kernels.cuda_build import CudaExtension

    ext = CudaExtension("t", Path("missing.cu"), [], "", [], "test kernel", "the fallback")
    ext.failed[False] = "RuntimeError: no nvcc"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, second = ext.load_or_warn(torch.device("cpu")), ext.load_or_warn(torch.device("cpu"))
    assert first is None and second is None
    assert len(seen) == 1 and seen[0].category is RuntimeWarning
    assert re.search("test kernel could not be built .*no nvcc.*using the fallback", str(seen[0].message))
    with pytest.raises(RuntimeError, match="no nvcc"):
        ext.load(torch.device("cpu"))


def test_a_refused_check_is_a_failed_build(monkeypatch, tmp_path) -> None:
    """CudaExtension(check=...) runs on the loaded module; its exception is remembered like a compiler error."""
    from pathlib import Path

    import torch.utils.cpp_extension as cpp

    from turboquant.kernels.cuda_build import CudaExtension

    def refuse(module: object) -> None:
        raise RuntimeError("dynamic shared memory starts at 0x410")

    monkeypatch.setenv("TURBOQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load_inline", lambda **kw: object())
    monkeypatch.setattr("turboquant.kernels.cuda_build.arch_flags", lambda dev: ("sm90a", []))
    src = Path(__file__).resolve().parents[1] / "turboquant" / "kernels" / "cuda_attention.cu"
    ext = CudaExtension("t", src, [], "", [], "test kernel", "the fallback", check=refuse)
    with pytest.warns(RuntimeWarning, match="0x410"):
        assert ext.load_or_warn(torch.device("cpu")) is None
    with pytest.raises(RuntimeError, match="0x410"):
        ext.load(torch.device("cpu"))


def test_the_table_base_is_one_number_in_header_and_python() -> None:
    """tq::SMEM_BASE (cuda_attention.cuh) and cuda_attention.SMEM_BASE, the value the load-time check expects."""
    from pathlib import Path

    from turboquant.kernels import cuda_attention

    header = (Path(cuda_attention.__file__).parent / "cuda_attention.cuh").read_text()
    assert int(re.search(r"SMEM_BASE = (0x[0-9a-fA-F]+);", header).group(1), 16) == cuda_attention.SMEM_BASE


def test_shape_errors_name_the_argument() -> None:
    cfg = QuantizerConfig(64, 4)
    codes = torch.zeros(2, 8, code_bytes(cfg), dtype=torch.uint8)
    with pytest.raises(ValueError, match="offset"):
        ce.cuda_quantize_into(torch.randn(2, 4, 64), cfg, codes, torch.zeros(2, 8), 0, offset=torch.zeros(64))
    with pytest.raises(ValueError, match="overflows"):
        ce.cuda_quantize_into(torch.randn(2, 4, 64), cfg, codes, torch.zeros(2, 8), 6)


# ---------------------------------------------------------------- GPU: the kernel


def _same(a: torch.Tensor, b: torch.Tensor, cfg: QuantizerConfig) -> float:
    return (decode_mse(a, cfg) == decode_mse(b, cfg)).float().mean().item()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_codes_and_norms_match_the_quantizer(d: int, bits: int, dtype: torch.dtype) -> None:
    cfg = QuantizerConfig(d, bits, seed=5, norm_dtype="float16" if bits != 3 else "float32")
    r, cap, t, start = 5, 300, 203, 37  # tokens not a multiple of a warp's 16
    x = (torch.randn(r, t, d, generator=torch.Generator().manual_seed(d + bits)) * 3).to("cuda", dtype)
    x[0, 0] = 0  # zero vector: norm 0, codes of 0
    x[1, 7, 3] = 1.0  # near one-hot rows: exact zeros after the Hadamard product
    codes = torch.full((r, cap, code_bytes(cfg)), 0xA5, dtype=torch.uint8, device="cuda")
    norms = torch.full((r, cap), float("nan"), dtype=getattr(torch, cfg.norm_dtype), device="cuda")
    out = ce.cuda_quantize_into(x, cfg, codes, norms, start)
    ref = TurboQuantizer.from_config(cfg).quantize(x.float())
    assert _same(out.codes, ref.codes, cfg) >= 0.999
    rel = ((out.norms.float() - ref.norms.float()).abs() / ref.norms.float().clamp_min(1e-30)).max().item()
    assert rel <= (1e-6 if cfg.norm_dtype == "float32" else 1e-3)
    assert (codes[:, :start] == 0xA5).all() and (codes[:, start + t :] == 0xA5).all()
    assert torch.isnan(norms[:, :start].float()).all() and torch.isnan(norms[:, start + t :].float()).all()


@gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scaled,one_product", [(True, False), (False, False), (False, True)])
def test_fused_offset_scale_and_norm_correction(bits: int, scaled: bool, one_product: bool, monkeypatch) -> None:
    """Offset (and scale) inside the kernel: two bf16 parts of x - off, or (one_product) y = Pi x - Pi off."""
    monkeypatch.setattr(ce, "ROFF_MIN_TOKEN_ROWS", 1 if one_product else 1 << 60)
    cfg = QuantizerConfig(128, bits, seed=1)
    b, h, t = 2, 3, 100
    x = torch.randn(b, h, t, 128, device="cuda", dtype=torch.bfloat16) + 2
    off = x.float().mean(2)
    inv = 1.0 / (1.0 + torch.rand(b, h, 128, device="cuda")) if scaled else None
    codes = torch.zeros(b, h, t, code_bytes(cfg), dtype=torch.uint8, device="cuda")
    norms = torch.zeros(b, h, t, device="cuda")
    out = ce.cuda_quantize_into(x, cfg, codes, norms, 0, offset=off, inv_scale=inv, norm_correction=True)
    xs = (x.float() - off.unsqueeze(2)) * (inv.unsqueeze(2) if scaled else 1.0)
    ref = TurboQuantizer.from_config(cfg).quantize(xs)
    assert _same(out.codes, ref.codes, cfg) >= 0.999
    want = ref.norms / reconstruction_norms(decode_mse(ref.codes, cfg))
    same_rows = (decode_mse(out.codes, cfg) == decode_mse(ref.codes, cfg)).all(-1)
    torch.testing.assert_close(out.norms[same_rows], want[same_rows], rtol=2e-6, atol=0)


@gpu
def test_haar_rotation_uses_two_parts() -> None:
    cfg = QuantizerConfig(64, 4, rotation="haar", seed=4)
    x = torch.randn(3, 50, 64, device="cuda", dtype=torch.bfloat16)
    codes = torch.zeros(3, 50, code_bytes(cfg), dtype=torch.uint8, device="cuda")
    out = ce.cuda_quantize_into(x, cfg, codes, torch.zeros(3, 50, device="cuda"), 0)
    ref = TurboQuantizer.from_config(cfg).quantize(x.float())
    assert _same(out.codes, ref.codes, cfg) >= 0.999


@gpu
def test_strided_input_and_fallback_configs() -> None:
    cfg = QuantizerConfig(128, 4)
    base = torch.randn(40, 2, 128, device="cuda", dtype=torch.bfloat16)
    x = base.transpose(0, 1)  # [2, 40, 128], token stride 256 elements
    codes = torch.zeros(2, 40, code_bytes(cfg), dtype=torch.uint8, device="cuda")
    out = ce.cuda_quantize_into(x, cfg, codes, torch.zeros(2, 40, device="cuda"), 0)
    assert _same(out.codes, TurboQuantizer.from_config(cfg).quantize(x.float()).codes, cfg) >= 0.999
    frac = QuantizerConfig(128, 2.5)  # two streams: the Triton encode
    c2 = torch.zeros(2, 40, code_bytes(frac), dtype=torch.uint8, device="cuda")
    assert not ce.cuda_encode_supports(x, frac, c2, torch.zeros(2, 40, device="cuda"))
    out2 = ce.cuda_quantize_into(x, frac, c2, torch.zeros(2, 40, device="cuda"), 0)
    assert _same(out2.codes, TurboQuantizer.from_config(frac).quantize(x.float()).codes, frac) >= 0.999
