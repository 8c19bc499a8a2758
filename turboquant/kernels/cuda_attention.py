"""CUDA C++ decode attention straight from packed TurboQuant codes (warp-level kernel, issue 9).

:func:`cuda_quantized_attention` has exactly the signature and semantics of
:func:`~turboquant.kernels.reference.torch_quantized_attention`. The kernel
(``cuda_attention.cu``, parameters in ``cuda_attention.cuh``) is compiled at first
use with ``torch.utils.cpp_extension.load_inline`` (nvcc + the host compiler torch
uses) and cached under ``$TURBOQUANT_CACHE_DIR`` or ``~/.cache/turboquant``; torch
rebuilds only when the sources change. Why ``load_inline`` rather than NVRTC:
torch passes tensors, the current stream and CUDA-graph capture through without
another dependency (NVRTC would need CuPy or cuda-python), and the same ``.cu``
compiles offline with plain ``nvcc -cubin`` for reading SASS between GPU runs.

What runs (the design is in the ``.cu`` header comment and docs/kernel_notes.md):

1. each CTA rotates its query rows in its prologue (``q @ Π_kᵀ``, natural coordinate order,
   read in the query's own dtype: no separate launch);
2. the warp-level kernel streams each (batch, kv head)'s codes split across CTAs
   (flash-decoding) and warps; every warp keeps its own online softmax; the CTA writes one partial
   ``(acc, max, sum)``;
3. fused finish (``CudaTuning.fused``, the default): the last CTA of each (batch, kv head)
   to finish (an arrival counter) merges the partials, rotates the value accumulator
   back (``acc @ Π_v``), adds the value offset, attends over the full-precision window
   and writes the output: one launch after the rotation. With ``fused=False`` step 3 is
   :func:`~turboquant.kernels.triton_attention.triton_attention_combine_kernel` (same
   partial format), kept for comparison.

Covered: MSE keys and values with equal integer widths 2, 3 or 4, head_dim 64 or
128, fp16 norms, codes whose rows are contiguous (``stride(-2) == code_bytes``, as
the cache and :func:`~turboquant.kernels.testing.random_codes` store them), any
GQA group, query length, mask and offsets. Anything else, a GPU older than sm_80
(the kernel uses ``mma.sync`` m16n8k16 and ``movmatrix``), or a failed build goes
to the Triton kernel (one warning for a failed build), which itself falls back to
the torch reference.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codebook import lloyd_max_codebook
from ..codec import code_bytes, layout
from ..config import QuantizerConfig, Variant
from ..quantizer import QuantizedVectors
from ..rotation import hadamard_blocks, make_rotation
from .cuda_build import CudaExtension
from .layout import device_cached, expand_mask, length_mask, num_sms, outside_graph_pool
from .reference import DEFAULT_CHUNK, attention_shapes, torch_quantized_attention
from .tuning import DEFAULT_CUDA_TUNING, DEFAULT_TUNING, CudaTuning

LOG2E = 1.4426950408889634
_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "cuda_attention.cu"
_HEADER = _HERE / "cuda_attention.cuh"
_WIDTHS = ((4, 4), (3, 3), (2, 2))
_DIMS = (64, 128)
WINDOW_TOKENS = 32  # full-precision tokens per window chunk: tq::WINDOW_TOKENS (cuda_attention.cuh)


_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda_attention.cuh"

cudaError_t tq_decode_dispatch(const tq::Params& p, int kbits, int vbits, int d, int bh, int rblocks, int nw,
                               int tiles, bool mask, int prefetch, int dec, int ctas, cudaStream_t s, int* info);

static int float_kind(const torch::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return 2;
  if (t.scalar_type() == at::kHalf) return 3;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "turboquant CUDA decode: float32/float16/bfloat16 expected");
  return 4;
}

static tq::Params make_params(const std::vector<int64_t>& c) {
  tq::Params p{};
  p.kc_sb = c[0]; p.kc_sh = c[1]; p.kc_sn = c[2];
  p.kn_sb = c[3]; p.kn_sh = c[4]; p.kn_sn = c[5];
  p.vc_sb = c[6]; p.vc_sh = c[7]; p.vc_sn = c[8];
  p.vn_sb = c[9]; p.vn_sh = c[10]; p.vn_sn = c[11];
  p.sm_b = c[12]; p.sm_h = c[13]; p.sm_l = c[14]; p.sm_t = c[15];
  p.mask_kind = (int)c[16]; p.ac = (int)c[17];
  p.n = (int)c[18]; p.hkv = (int)c[19]; p.m = (int)c[20]; p.l = (int)c[21]; p.g = (int)c[22];
  p.tps = (int)c[23]; p.splits = (int)c[24];
  for (int i = 0; i < 4; ++i) { p.ktab[i] = (uint32_t)c[25 + i]; p.vtab[i] = (uint32_t)c[29 + i]; }
  for (int i = 0; i < 16; ++i) { p.kcent[i] = (unsigned short)c[33 + i]; p.vcent[i] = (unsigned short)c[49 + i]; }
  TORCH_CHECK(c.size() == 84 && c[66] == tq::WINDOW_TOKENS, "turboquant CUDA decode: window chunk size mismatch");
  p.wchunks = (int)c[65];
  p.fwht = (int)c[67];
  for (int i = 0; i < 8; ++i) { p.ksign[i / 4][i % 4] = (uint32_t)c[68 + i]; p.vsign[i / 4][i % 4] = (uint32_t)c[76 + i]; }
  return p;
}

// v = {kbits, vbits, d, bh, rblocks, warps, tiles, prefetch, decoder, CTAs per SM}
// q [BH, M, D] (fp32/fp16/bf16, contiguous) and rt = Pi_k^T [D, D] fp32: the kernel rotates the query.
// fused finish when out is given: counter [BH * rblocks] int32 (zero), pv [D, D] fp32, voff [BH, D] fp32,
// fk / fv [B, Hkv, W, D] (W > 0 only), out [BH, M, D] in the query dtype.
// ndev: int32 [1] count of compressed tokens to attend (graph-safe), wmask: the mask covers the window only (fused).
void decode(torch::Tensor q, c10::optional<torch::Tensor> qoff, torch::Tensor kc, torch::Tensor kn,
            torch::Tensor vc, torch::Tensor vn, c10::optional<torch::Tensor> mask, torch::Tensor part,
            double scale2, std::vector<int64_t> c, std::vector<int64_t> v, torch::Tensor rt,
            c10::optional<torch::Tensor> out, c10::optional<torch::Tensor> counter, c10::optional<torch::Tensor> pv,
            c10::optional<torch::Tensor> voff, c10::optional<torch::Tensor> fk, c10::optional<torch::Tensor> fv,
            c10::optional<torch::Tensor> ndev, int64_t wmask) {
  const c10::cuda::CUDAGuard guard(q.device());
  tq::Params p = make_params(c);
  p.n_dev = ndev.has_value() ? ndev->data_ptr<int>() : nullptr;
  p.wmask = (int)wmask;
  p.fused = out.has_value() ? 1 : 0;
  if (p.fused) {
    p.out = out->data_ptr();
    p.out_kind = float_kind(*out);
    p.counter = counter->data_ptr<int>();
    p.pv = pv->data_ptr<float>();
    p.voff = voff.has_value() ? voff->data_ptr<float>() : nullptr;
    p.w = 0;
    if (fk.has_value()) {
      p.fk = fk->data_ptr();
      p.fv = fv->data_ptr();
      p.fk_kind = float_kind(*fk);
      p.fv_kind = float_kind(*fv);
      p.fk_sb = fk->stride(0); p.fk_sh = fk->stride(1); p.fk_sw = fk->stride(2);
      p.fv_sb = fv->stride(0); p.fv_sh = fv->stride(1); p.fv_sw = fv->stride(2);
      p.w = (int)fk->size(2);
    }
  }
  p.q = q.data_ptr();
  p.q_kind = float_kind(q);
  p.rt = rt.data_ptr<float>();
  p.qoff = qoff.has_value() ? qoff->data_ptr<float>() : nullptr;
  p.scale2 = (float)scale2;
  p.kc = kc.data_ptr<uint8_t>();
  p.vc = vc.data_ptr<uint8_t>();
  p.kn = reinterpret_cast<const __half*>(kn.data_ptr<at::Half>());
  p.vn = reinterpret_cast<const __half*>(vn.data_ptr<at::Half>());
  p.mask = mask.has_value() ? mask->data_ptr() : nullptr;
  p.part = part.data_ptr<float>();
  cudaError_t err = tq_decode_dispatch(p, (int)v[0], (int)v[1], (int)v[2], (int)v[3], (int)v[4], (int)v[5],
                                       (int)v[6], p.mask != nullptr && !p.wmask, (int)v[7], (int)v[8], (int)v[9],
                                       c10::cuda::getCurrentCUDAStream().stream(), nullptr);
  TORCH_CHECK(err == cudaSuccess, "turboquant CUDA decode: ", cudaGetErrorString(err));
}

cudaError_t tq_smem_base(unsigned* out_dev, cudaStream_t s);

// Where dynamic shared memory starts in a CTA's window (the table decoder's loads assume tq::SMEM_BASE)
int64_t smem_base() {
  auto buf = torch::zeros({1}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  const c10::cuda::CUDAGuard guard(buf.device());
  cudaError_t err = tq_smem_base(reinterpret_cast<unsigned*>(buf.data_ptr<int>()), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "turboquant CUDA smem_base: ", cudaGetErrorString(err));
  return buf.item<int>();
}

// {registers, spill bytes, CTAs per SM, shared-memory bytes} of one variant
std::vector<int64_t> variant_info(std::vector<int64_t> v, bool mask) {
  tq::Params p{};
  int info[4] = {0, 0, 0, 0};
  cudaError_t err = tq_decode_dispatch(p, (int)v[0], (int)v[1], (int)v[2], 1, 1, (int)v[5], (int)v[6], mask,
                                       (int)v[7], (int)v[8], (int)v[9], nullptr, info);
  TORCH_CHECK(err == cudaSuccess, "turboquant CUDA variant: ", cudaGetErrorString(err));
  return {info[0], info[1], info[2], info[3]};
}
"""

SMEM_BASE = 0x400  # tq::SMEM_BASE (cuda_attention.cuh): where dynamic shared memory starts in a CTA's window


def _check_smem_base(module: Any) -> None:
    """The table decoder addresses shared memory with SMEM_BASE as an immediate: refuse a build where it moved."""
    base = int(module.smem_base())
    if base != SMEM_BASE:
        raise RuntimeError(f"dynamic shared memory starts at {base:#x} in a CTA's window, the kernel assumes {SMEM_BASE:#x}")


_EXTENSION = CudaExtension("turboquant_cuda_attention", _SOURCE, [_HEADER], _BINDING, ["decode", "variant_info", "smem_base"],
                           "CUDA decode-attention kernel", "the Triton kernel", check=_check_smem_base)  # fmt: skip
_MODULES = _EXTENSION.modules  # keyed by ``tune`` (the benchmark swaps in a spy)


def load_extension(device: torch.device | None = None, tune: bool = False) -> Any:
    """Compile (first use) and load the extension; raise on failure.

    ``tune=True`` builds the extra launch variants the benchmark sweeps (``-DTQ_TUNE``).
    """
    return _EXTENSION.load(device, tune)


def _module(device: torch.device, tune: bool = False) -> Any | None:
    """The loaded extension (``tune``: with the sweep variants), or None (one warning) when it cannot be built."""
    return _EXTENSION.load_or_warn(device, tune)


def cuda_extension_available(device: torch.device | None = None) -> bool:
    """Whether the extension is built (building it on first call) for ``device``."""
    if not torch.cuda.is_available():
        return False
    dev = device or torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return False
    return _module(dev) is not None


def _widths(config: QuantizerConfig) -> int | None:
    streams = layout(config).streams
    if config.variant is not Variant.MSE or len(streams) != 1:
        return None
    return streams[0].width


_ALIGN = {  # widest load of a row slice, in bytes: (bits, d) -> alignment the codes need
    (4, 128): 16, (4, 64): 8, (3, 128): 4, (3, 64): 4, (2, 128): 8, (2, 64): 4,
}  # fmt: skip


def cuda_supports(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None = None,
    full_values: torch.Tensor | None = None,
) -> bool:
    """Whether :func:`cuda_quantized_attention` runs its own kernel for these inputs (else Triton/torch)."""
    if query.dim() != 4 or not query.is_cuda or query.shape[-1] not in _DIMS:
        return False
    if keys is None or values is None or keys.shape[-1] == 0:
        return False
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return False
    d = query.shape[-1]
    kb, vb = _widths(keys.config), _widths(values.config)
    if (kb, vb) not in _WIDTHS:
        return False
    for qv, bits in ((keys, kb), (values, vb)):
        cfg = qv.config
        if cfg.dim != d or qv.norms.dtype != torch.float16 or qv.codes.dtype != torch.uint8:
            return False
        c = qv.codes
        if c.dim() != 4 or qv.norms.dim() != 3 or not c.is_cuda:
            return False
        if c.stride(-1) != 1 or c.stride(-2) != code_bytes(cfg) or qv.norms.stride(-1) != 1:
            return False
        a = _ALIGN[(bits, d)]
        if c.data_ptr() % a or c.stride(0) % a or c.stride(1) % a:
            return False
    return True


@device_cached(maxsize=64)
def _rotation_t(config: QuantizerConfig, device: torch.device) -> torch.Tensor:
    """``Π_kᵀ`` (float32 ``[d, d]``): ``q @ this`` is the rotated query in natural coordinate order."""
    return make_rotation(config.rotation, config.dim, config.seed).matrix(device).T.contiguous()


@device_cached(maxsize=64)
def _rotation(config: QuantizerConfig, device: torch.device) -> torch.Tensor:
    """``Π_v`` (float32 ``[d, d]``, contiguous): the fused finish computes ``acc @ this``."""
    return make_rotation(config.rotation, config.dim, config.seed).matrix(device).float().contiguous()


@lru_cache(maxsize=64)
def hadamard_sign_words(config: QuantizerConfig) -> tuple[int, ...] | None:
    """The two stages' sign bits of a power-of-two ``hadamard`` rotation, 4 words each (``Params.ksign``), else None.

    Bit ``c % 32`` of word ``c // 32`` of stage ``s`` is set when coordinate ``c``'s sign is −1: the kernel then
    rotates with in-warp Walsh-Hadamard butterflies (``rows_hadamard``) instead of the dense matrix.
    """
    rot = make_rotation(config.rotation, config.dim, config.seed)
    if rot.signs is None or hadamard_blocks(config.dim) != ((0, config.dim), (0, config.dim)) or config.dim > 128:
        return None
    words = []
    for stage in range(2):
        neg = np.zeros(128, dtype=np.uint64)
        neg[: config.dim] = rot.signs[stage] < 0
        words += [int((neg[32 * w : 32 * w + 32] << np.arange(32, dtype=np.uint64)).sum()) for w in range(4)]
    return tuple(words)


def _sign_args(kcfg: QuantizerConfig, vcfg: QuantizerConfig) -> list[int]:
    """``[fwht, ksign[8], vsign[8]]`` of the parameter vector: butterflies when both rotations allow them."""
    ks, vs = hadamard_sign_words(kcfg), hadamard_sign_words(vcfg)
    if ks is None or vs is None:
        return [0] * 17
    return [1, *ks, *vs]


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _counters(size: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters of the fused finish (the kernel leaves them zero again).

    Kept per (device, stream) so that launches on different streams never share one; inside
    a CUDA-graph capture a buffer that was not made before is allocated (and zeroed) in the graph.
    """
    stream = torch.cuda.current_stream(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream.cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= size:
        return buf
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    buf = outside_graph_pool(device, lambda: torch.zeros(max(size, 4096), dtype=torch.int32, device=device))
    _COUNTERS[key] = buf
    return buf


@lru_cache(maxsize=32)
def _tables(dim: int, bits: int) -> tuple[list[int], list[int]]:
    """Register-decoder tables (4 words) and the fp16 centroid bits (16 entries) of a codebook."""
    c = np.asarray(lloyd_max_codebook(dim, bits).centroids, dtype=np.float16)
    raw = [int(v) for v in c.view(np.uint16)]
    if bits == 4:
        assert all(c[15 - i] == -c[i] for i in range(16)), "4-bit codebook is not odd-symmetric in fp16"
        src = raw[8:]  # magnitudes |c[8 + r]|
    else:
        src = raw
    lo = [v & 0xFF for v in src] + [0] * 8
    hi = [v >> 8 for v in src] + [0] * 8

    def word(bs: list[int]) -> int:
        return sum(b << (8 * i) for i, b in enumerate(bs))

    if bits == 2:
        tab = [word(lo[:4]), word(hi[:4]), 0, 0]
    else:
        tab = [word(lo[:4]), word(lo[4:8]), word(hi[:4]), word(hi[4:8])]
    return tab, (raw + [0] * 16)[:16]


_INFO: dict[tuple, tuple[int, int, int, int]] = {}


def _resolve_variant(kb: int, vb: int, tuning: CudaTuning) -> tuple[int, int, int, int, int]:
    if tuning.variant is not None:
        return tuning.variant  # type: ignore[return-value]  (CudaTuning makes it five ints)
    return (8, 2, 0, 1, 0)


def variant_info(
    kb: int, vb: int, d: int, variant: tuple[int, ...], mask: bool, device: torch.device, tune: bool = False
) -> tuple[int, int, int, int]:
    """``(registers, spill bytes, CTAs per SM, shared bytes)`` of the kernel that this variant launches."""
    key = (kb, vb, d, variant, mask, device.index, tune)
    if key not in _INFO:
        mod = _module(device, tune)
        assert mod is not None
        nw, tiles, pf, dec, ctas = variant
        _INFO[key] = tuple(mod.variant_info([kb, vb, d, 1, 1, nw, tiles, pf, dec, ctas], mask))  # type: ignore[assignment]
    return _INFO[key]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of the partials (tests replace it to poison the memory)."""
    return torch.empty(*shape, dtype=dtype, device=device)


_MASK_KIND = {torch.bool: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}  # other dtypes: as float32


def _fallback(*args: Any) -> torch.Tensor:
    from . import triton_available

    if triton_available():
        from .triton_attention import triton_quantized_attention

        return triton_quantized_attention(*args)
    return torch_quantized_attention(*args)


# Same signature as kernels.reference.torch_quantized_attention (the specification).
def cuda_quantized_attention(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None,
    full_values: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    key_offset: torch.Tensor | None = None,
    value_offset: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    *,
    tuning: CudaTuning = DEFAULT_CUDA_TUNING,
    compressed_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over compressed tokens then full-precision tokens, with the warp-level CUDA kernel.

    Arguments, shapes and result as :func:`~turboquant.kernels.reference.torch_quantized_attention`
    (``chunk`` is ignored), plus ``tuning`` (:class:`~turboquant.kernels.tuning.CudaTuning`) and
    ``compressed_length`` (see :func:`turboquant.kernels.quantized_attention`: a 0-d integer tensor
    the kernel reads on the device; ``mask`` then covers the full-precision tokens only). Inputs
    the kernel does not cover (see :func:`cuda_supports`) go to the Triton kernel.
    """
    b, hq, l, d, n, w, hkv = attention_shapes(query, keys, values, full_keys, None)
    tune = tuning.variant is not None
    mod = _module(query.device, tune) if cuda_supports(query, keys, values, full_keys, full_values) else None
    if compressed_length is not None and (mod is None or not tuning.fused):
        # only the fused kernel reads the count: every other path gets the equivalent full mask
        mask, compressed_length = length_mask(n, compressed_length, mask, w), None
    if mod is None:
        return _fallback(query, keys, values, full_keys, full_values, scaling, mask, key_offset, value_offset, chunk)
    assert keys is not None and values is not None
    g = hq // hkv
    m = g * l
    bh = b * hkv
    dev = query.device
    scale2 = float(scaling) * LOG2E
    kcfg, vcfg = keys.config, values.config
    kb, vb = _widths(kcfg), _widths(vcfg)
    assert kb is not None and vb is not None

    # the kernel reads the query as given (fp32/fp16/bf16) and rotates it in its prologue
    qin = query.reshape(b, hkv, m, d)
    if qin.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        qin = qin.float()
    if not qin.is_contiguous():
        qin = qin.contiguous()
    qoff = None
    if key_offset is not None:
        qoff = (qin.float() @ key_offset.float().unsqueeze(-1)).squeeze(-1).contiguous()

    mask4 = None
    ms = (0, 0, 0, 0)
    kind = 0
    if mask is not None:
        mk = mask
        if mk.dtype not in _MASK_KIND:
            mk = mk.float()
        kind = _MASK_KIND[mk.dtype]
        mask4 = expand_mask(mk, b, hq, l, w if compressed_length is not None else n + w)
        ms = mask4.stride()
    ndev = None
    if compressed_length is not None:  # read on the device: a CUDA graph replays with the current count
        ndev = compressed_length.reshape(1)
        if ndev.dtype != torch.int32:
            ndev = ndev.to(torch.int32)
    wmask = int(compressed_length is not None and mask4 is not None)

    variant = _resolve_variant(kb, vb, tuning)
    nw, tiles, pf, dec, min_ctas = variant
    _, _, ctas_per_sm, _ = variant_info(kb, vb, d, variant, mask4 is not None and not wmask, dev, tune)
    rblocks = -(-m // 8)
    slots = max(1, ctas_per_sm) * num_sms(dev) * tuning.waves
    per_cta = nw * 16 * tiles  # tokens of one iteration of every warp
    splits = max(1, min(slots // max(1, bh * rblocks), _cdiv(n, per_cta)))
    tps = _cdiv(_cdiv(n, splits), per_cta) * per_cta  # whole iterations for every warp
    splits = _cdiv(n, tps)
    ac = 16 + d
    # fused: the window in chunks of WINDOW_TOKENS, chunk i attended by split i % splits before its tokens
    wchunks = _cdiv(w, WINDOW_TOKENS) if tuning.fused else 0
    # partials of the splits (none when one split finishes from its shared memory), then of the window chunks
    direct = tuning.fused and splits == 1
    nparts = (0 if direct else splits) + wchunks
    parts = _empty(*((bh, splits + wchunks, m, ac + 2) if nparts else (1,)), dtype=torch.float32, device=dev)

    ktab, kcent = _tables(d, kb)
    vtab, vcent = _tables(d, vb)
    kc, kn, vc, vn = keys.codes, keys.norms, values.codes, values.norms
    c = [
        kc.stride(0), kc.stride(1), kc.stride(2),
        kn.stride(0), kn.stride(1), kn.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        vn.stride(0), vn.stride(1), vn.stride(2),
        *ms, kind, ac, n, hkv, m, l, g, tps, splits,
        *ktab, *vtab, *kcent, *vcent, wchunks, WINDOW_TOKENS,
        *_sign_args(kcfg, vcfg),
    ]  # fmt: skip
    v = [kb, vb, d, bh, rblocks, nw, tiles, pf, dec, min_ctas]
    rt = _rotation_t(kcfg, dev)
    if tuning.fused:
        # one launch: the last CTA of each (batch, kv head, row block) merges the splits, rotates back,
        # adds the value offset, merges the window chunks and writes the output
        out = _empty(b, hkv, m, d, dtype=query.dtype, device=dev)
        odt = out if out.dtype in (torch.float32, torch.float16, torch.bfloat16) else None
        if odt is None:  # other query dtypes: computed in float32, cast after
            out = _empty(b, hkv, m, d, dtype=torch.float32, device=dev)
        voff = value_offset.float().reshape(bh, d).contiguous() if value_offset is not None else None
        fk = fv = None
        if w:
            assert full_keys is not None and full_values is not None
            fk, fv = full_keys, full_values
            if fk.dtype not in (torch.float32, torch.float16, torch.bfloat16) or fk.stride(-1) != 1:
                fk = fk.float().contiguous()
            if fv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or fv.stride(-1) != 1:
                fv = fv.float().contiguous()
        counter = _counters(bh * rblocks, dev) if not direct else _counters(1, dev)
        mod.decode(qin, qoff, kc, kn, vc, vn, mask4, parts, scale2, c, v, rt, out, counter, _rotation(vcfg, dev), voff, fk, fv,
                   ndev, wmask)  # fmt: skip
        if odt is None:
            out = out.to(query.dtype)
        return out.reshape(b, hq, l, d)
    mod.decode(qin, qoff, kc, kn, vc, vn, mask4, parts, scale2, c, v, rt, None, None, None, None, None, None, None, 0)
    qf = qin.float()

    from .triton_combine import combine_partials

    # combine: the Triton kernel of triton_attention.py (same partial format; an empty 16-column high stream)
    block_m = min(max(16, 1 << max(0, (m - 1).bit_length())), DEFAULT_TUNING.max_block_m)
    out = combine_partials(
        parts, 16, d, False, vcfg, n, qf, l, scale2, full_keys, full_values,
        mask4, mask is not None and mask.dtype == torch.bool, value_offset, query.dtype, block_m,
    )  # fmt: skip
    return out.reshape(b, hq, l, d)


__all__ = [
    "cuda_extension_available",
    "cuda_quantized_attention",
    "cuda_supports",
    "load_extension",
    "variant_info",
]
