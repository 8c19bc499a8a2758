"""The warp-level CUDA decode kernel (turboquant/kernels/cuda_attention.py) against float64 references.

Needs a CUDA GPU (sm_80+) with nvcc: the kernel is CUDA C++ compiled at first use. Without one
(CI) every test here is skipped; the CPU/TRITON_INTERPRET tests of tests/test_kernels.py keep
covering the shared combine kernel and the reference.
"""

from __future__ import annotations

import pytest
import torch

from turboquant import QuantizerConfig
from turboquant.kernels.testing import float64_attention, random_codes, relative_error

CUDA_OK = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
pytestmark = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU (sm_80+): the kernel is CUDA C++ built with nvcc")

TOL = 3e-3  # fp16 query and probabilities, fp32 accumulation (Triton's precise=0 measured <= 2.7e-4)


@pytest.fixture(scope="module")
def ca():
    from turboquant.kernels import cuda_attention

    cuda_attention.load_extension()  # a build failure on a GPU machine is a test failure, not a skip
    return cuda_attention


@pytest.fixture
def poisoned(ca, monkeypatch):
    """Partials and outputs start as NaN: every element must be written."""
    from turboquant.kernels import triton_attention as ta

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ca, "_empty", nan_empty)
    monkeypatch.setattr(ta, "_empty", nan_empty)
    from turboquant.kernels import triton_combine

    monkeypatch.setattr(triton_combine, "_empty", nan_empty)


def _inputs(bits, d, b, hq, hkv, l, n, w, capacity=None, seed=0):
    torch.manual_seed(seed)
    dev = "cuda"
    kc = QuantizerConfig(d, bits, seed=11, norm_dtype="float16")
    vc = QuantizerConfig(d, bits, seed=12, norm_dtype="float16")
    keys = random_codes(kc, (b, hkv, n), dev, capacity=capacity)
    values = random_codes(vc, (b, hkv, n), dev, capacity=capacity)
    # queries large enough that the softmax is far from uniform (scores spread over several units)
    q = torch.randn(b, hq, l, d, device=dev) * 3.0
    fk = torch.randn(b, hkv, w, d, device=dev) if w else None
    fv = torch.randn(b, hkv, w, d, device=dev) if w else None
    return q, keys, values, fk, fv


def _check(ca, q, keys, values, fk, fv, mask=None, koff=None, voff=None, tol=TOL, tuning=None):
    from turboquant.kernels.tuning import DEFAULT_CUDA_TUNING

    d = q.shape[-1]
    assert ca.cuda_supports(q, keys, values, fk, fv), "the CUDA kernel must run (not a fallback)"
    out = ca.cuda_quantized_attention(q, keys, values, fk, fv, d**-0.5, mask, koff, voff, tuning=tuning or DEFAULT_CUDA_TUNING)
    ref = float64_attention(q, keys, values, fk, fv, d**-0.5, mask, koff, voff)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = relative_error(out, ref)
    assert err < tol, f"relative error {err:.2e}"
    return err


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("hkv,hq", [(8, 8), (2, 8), (1, 8)])
def test_widths_dims_gqa(ca, poisoned, bits, d, hkv, hq):
    q, k, v, fk, fv = _inputs(bits, d, 2, hq, hkv, 1, 3000, 0)
    _check(ca, q, k, v, fk, fv)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65, 1000, 4097])
def test_contexts(ca, poisoned, n):
    for bits in (4, 3, 2):
        q, k, v, fk, fv = _inputs(bits, 128, 1, 32, 8, 1, n, 3, seed=n)
        _check(ca, q, k, v, fk, fv)


def test_long_context_100k(ca, poisoned):
    for bits in (4, 2):
        q, k, v, fk, fv = _inputs(bits, 128, 1, 32, 8, 1, 100_000, 16)
        _check(ca, q, k, v, fk, fv)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("kind", ["bool", "float", "half"])
def test_masks_offsets_window(ca, poisoned, bits, kind, fused):
    from turboquant.kernels.tuning import CudaTuning

    b, hq, hkv, l, n, w = 2, 8, 2, 3, 777, 5  # l = 3: 12 query rows per kv head = two row blocks
    q, k, v, fk, fv = _inputs(bits, 128, b, hq, hkv, l, n, w, capacity=1024)
    g = torch.Generator(device="cuda").manual_seed(5)
    keep = torch.rand(b, 1, l, n + w, device="cuda", generator=g) > 0.3
    keep[..., -1] = True  # no fully masked row here (tested below)
    if kind == "bool":
        mask = keep
    else:
        mask = torch.where(keep, torch.randn(keep.shape, device="cuda", generator=g), torch.tensor(float("-inf"), device="cuda"))
        mask = mask.half() if kind == "half" else mask
    koff = torch.randn(b, hkv, 128, device="cuda") * 0.3
    voff = torch.randn(b, hkv, 128, device="cuda") * 0.3
    _check(ca, q, k, v, fk, fv, mask, koff, voff, tuning=CudaTuning(fused=fused))


def test_many_splits_window_offsets_fully_masked(ca, poisoned):
    """B=1: dozens of splits merged by the last CTA, with a window of 40 tokens (two 32-token chunks),
    a value offset, a mask and one head whose every column (compressed and window) is masked."""
    b, hq, hkv, l, n, w = 1, 32, 8, 1, 20011, 40
    for bits in (4, 3, 2):
        q, k, v, fk, fv = _inputs(bits, 128, b, hq, hkv, l, n, w, seed=bits)
        mask = torch.rand(b, hq, l, n + w, device="cuda") > 0.2
        mask[0, 5] = False
        voff = torch.randn(b, hkv, 128, device="cuda") * 0.3
        out = ca.cuda_quantized_attention(q, k, v, fk.half(), fv.bfloat16(), 128**-0.5, mask, None, voff)
        ref = float64_attention(q, k, v, fk.half(), fv.bfloat16(), 128**-0.5, mask, None, voff)
        assert torch.equal(out[0, 5], torch.zeros_like(out[0, 5]))
        assert relative_error(out, ref) < TOL


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("d", [128, 64])
def test_long_window_in_chunks(ca, poisoned, bits, d):
    """A window longer than one finish chunk (300 tokens = 128 + 128 + 44), 8 query rows per kv head,
    under a full mask, under a window-only mask with a device count, and with no compressed mass at all."""
    from turboquant.kernels.layout import length_mask

    b, hq, hkv, l, n, w = 2, 8, 2, 2, 3000, 300
    q, k, v, fk, fv = _inputs(bits, d, b, hq, hkv, l, n, w, seed=11)
    mask = torch.rand(b, 1, l, n + w, device="cuda") > 0.25
    voff = torch.randn(b, hkv, d, device="cuda") * 0.3
    _check(ca, q, k, v, fk, fv, mask, None, voff)
    wm = torch.rand(b, 1, 1, w, device="cuda") > 0.4
    for count in (2500, 0):
        n_t = torch.tensor(count, device="cuda")
        out = ca.cuda_quantized_attention(q, k, v, fk, fv, d**-0.5, wm, None, voff, compressed_length=n_t)
        ref = float64_attention(q, k, v, fk, fv, d**-0.5, length_mask(n, n_t, wm, w), None, voff)
        assert relative_error(out, ref) < TOL, count


def test_per_head_mask_and_fully_masked_rows(ca, poisoned):
    b, hq, hkv, l, n = 1, 8, 2, 2, 300
    q, k, v, fk, fv = _inputs(4, 128, b, hq, hkv, l, n, 0)
    mask = torch.rand(b, hq, l, n, device="cuda") > 0.5
    mask[0, 3] = False  # every column of head 3 masked: its rows are 0
    out = ca.cuda_quantized_attention(q, k, v, None, None, 128**-0.5, mask)
    ref = float64_attention(q, k, v, None, None, 128**-0.5, mask)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3]))
    assert relative_error(out, ref) < TOL


def test_strided_capacity_views_and_dtypes(ca, poisoned):
    q, k, v, fk, fv = _inputs(4, 128, 2, 16, 4, 1, 2500, 7, capacity=4096)
    assert k.codes.stride(2) == k.codes.shape[-1] and not k.codes.is_contiguous()
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        _check(ca, q.to(dt), k, v, None if fk is None else fk.to(dt), None if fv is None else fv.to(dt), tol=6e-3)


def test_dispatch_and_fallback(ca):
    from turboquant.config import Backend
    from turboquant.kernels import quantized_attention, resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) is Backend.CUDA
    q, k, v, fk, fv = _inputs(4, 128, 1, 8, 2, 1, 500, 0)
    out = quantized_attention(q, k, v, fk, fv, 128**-0.5)
    ref = float64_attention(q, k, v, fk, fv, 128**-0.5)
    assert relative_error(out, ref) < TOL
    # fractional rate and head_dim 96: not covered by the CUDA kernel, the Triton kernel answers
    torch.manual_seed(1)
    for cfg_bits, d in ((2.5, 128), (4, 96)):
        kc = QuantizerConfig(d, cfg_bits, seed=1, norm_dtype="float16")
        keys = random_codes(kc, (1, 2, 300), "cuda")
        values = random_codes(kc, (1, 2, 300), "cuda")
        qq = torch.randn(1, 8, 1, d, device="cuda")
        assert not ca.cuda_supports(qq, keys, values)
        out = quantized_attention(qq, keys, values, None, None, d**-0.5, backend="cuda")
        assert relative_error(out, float64_attention(qq, keys, values, None, None, d**-0.5)) < TOL


def _capture(f):
    """``f`` warmed up on a side stream, then captured: ``(graph, the output tensor its replays write)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    return graph, out


def test_cuda_graph_capture(ca):
    q, k, v, fk, fv = _inputs(4, 128, 2, 32, 8, 1, 5000, 4)
    f = lambda: ca.cuda_quantized_attention(q, k, v, fk, fv, 128**-0.5)  # noqa: E731
    ref = f().clone()
    graph, out = _capture(f)
    for _ in range(3):  # the arrival counters must be back to zero after every replay
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
    assert torch.equal(f(), ref)  # and eager calls after the graph


def test_fused_equals_triton_combine(ca):
    from turboquant.kernels.tuning import CudaTuning

    q, k, v, fk, fv = _inputs(4, 128, 2, 32, 8, 1, 30000, 8)
    a = ca.cuda_quantized_attention(q, k, v, fk, fv, 128**-0.5)
    b = ca.cuda_quantized_attention(q, k, v, fk, fv, 128**-0.5, tuning=CudaTuning(fused=False))
    assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("count", [0, 1, 777, 5000])
@pytest.mark.parametrize("window_mask", ["none", "bool", "additive"])
def test_compressed_length_read_on_the_device(ca, bits, count, window_mask):
    """``compressed_length``: the kernel attends the first ``count`` codes (no per-token mask), the
    window under its own mask; equal to float64 with the equivalent full mask."""
    from turboquant.kernels.layout import length_mask

    q, k, v, fk, fv = _inputs(bits, 128, 2, 32, 8, 1, 5000, 6)
    wm = None
    if window_mask != "none":
        wm = torch.rand(2, 1, 1, 6, device="cuda") > 0.3
        wm[..., 0] = True
        if window_mask == "additive":
            wm = torch.zeros(wm.shape, device="cuda").masked_fill(~wm, float("-inf"))
    n_t = torch.tensor(count, device="cuda")
    out = ca.cuda_quantized_attention(q, k, v, fk, fv, 128**-0.5, wm, compressed_length=n_t)
    ref = float64_attention(q, k, v, fk, fv, 128**-0.5, length_mask(5000, n_t, wm, 6))
    assert relative_error(out, ref) < TOL


def test_compressed_length_replays_in_a_graph(ca):
    """A captured call replays with the count's current value (the static cache's decode step)."""
    from turboquant.kernels.layout import length_mask

    q, k, v, fk, fv = _inputs(4, 128, 2, 32, 8, 1, 8000, 4)
    n_t = torch.tensor(100, device="cuda")
    f = lambda: ca.cuda_quantized_attention(q, k, v, fk, fv, 128**-0.5, compressed_length=n_t)  # noqa: E731
    graph, out = _capture(f)
    for count in (100, 4321, 8000, 0):
        n_t.fill_(count)
        graph.replay()
        torch.cuda.synchronize()
        ref = float64_attention(q, k, v, fk, fv, 128**-0.5, length_mask(8000, n_t, None, 4))
        assert relative_error(out, ref) < TOL, count


def test_dynamic_shared_memory_starts_where_the_table_loads_assume(ca):
    """The table decoder's loads carry tq::SMEM_BASE as an immediate (no add per lookup): the probe kernel sees it."""
    assert ca.load_extension().smem_base() == ca.SMEM_BASE
