"""Fast CPU decode attention straight from TurboQuant codes.

:func:`cpu_quantized_attention` has exactly the signature and semantics of
:func:`~turboquant.kernels.reference.torch_quantized_attention` (the specification)
and is meant for CPU tensors during decoding (few query rows per kv head).

Why a separate path: the reference decodes codes ``chunk`` tokens at a time into
float tensors and runs a dozen torch ops per chunk (online softmax), which costs
~0.5 ms per layer in dispatch alone at short contexts and writes/reads a float32
copy of every chunk at long ones. Here one C function (``_cpu_attention.c``,
compiled with the system C compiler at first use and called through ``ctypes``)
does the whole attention of a layer:

* the query is rotated once (``Π_k q``) and ``<q, μ_k>`` computed once per row;
* each key code is decoded once per kv head into a ``d``-float register-sized
  buffer by one table lookup per byte (``table[byte]`` = the ``8/b`` centroids it
  packs, widths 1, 2, 4, 8; a bit reader for 3, 5, 6, 7 and fractional rates) and
  dotted with the ``G·L`` rotated query rows of that head (paper Alg. 1 line 9 with
  ``<q, k> = ‖k‖ <Π q, ŷ>``);
* softmax per block of tokens with the block's own max, values accumulated as
  ``Σ p_i ‖v_i‖ ŷ_i`` in the rotated domain and rotated back once per row
  (``Π_vᵀ``), blocks merged with the usual max rescaling (flash-decoding);
* blocks of all heads are spread over ``torch.get_num_threads()`` POSIX threads
  when the history is long (threads are started per call, so short histories run
  on the calling thread).

It reads each code byte once and never materialises floats of the history, so at
long contexts it streams ``code_bytes + norm`` bytes per token and head (34 bytes
for K4 at d=64, vs 256 bytes of float32).

Falls back to the reference (same results) for: the ``prod`` key variant, many
query rows per kv head (``G·L > 64``: prefill chunks, where the reference's
matrix products win), head dims over 1024, non-CPU tensors, or when no C
compiler is available (``TURBOQUANT_NO_CEXT=1`` forces this).
"""

from __future__ import annotations

import array
import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from ..codebook import codebook_tensors
from ..codec import byte_table, layout
from ..config import QuantizerConfig, Variant
from ..quantizer import QuantizedVectors
from ..rotation import make_rotation
from .cbuild import build_error, load_c_library
from .reference import DEFAULT_CHUNK, attention_shapes, torch_quantized_attention

_SOURCE = Path(__file__).with_name("_cpu_attention.c")
#: Query rows per kv head (G·L) above which the reference (BLAS matrix products) is faster.
MAX_ROWS = 64
_MAX_DIM = 1024
#: Tokens per block (one task of the C kernel).
BLOCK = 256
#: Below this many (token, kv head) pairs the attention runs on the calling thread:
#: starting threads (~20 µs each) would cost more than it saves.
_THREAD_MIN_WORK = 16384

# Indices of the parameter array (the P_* enum of _cpu_attention.c).
(P_B, P_HKV, P_G, P_L, P_D, P_N, P_W, P_THREADS, P_BLOCK, P_Q, P_OUT) = range(11)
P_KC, P_KN, P_VC, P_VN = 11, 15, 20, 24
P_KSPEC, P_VSPEC = 29, 38
P_PK = 47
P_KOFF, P_VOFF, P_FK, P_FV, P_MASK = 49, 50, 51, 52, 53  # P_MASK + 1..5: type, strides
P_COUNT = 59


def _declare(lib: ctypes.CDLL) -> None:
    lib.tq_decode_attention.argtypes = [ctypes.c_void_p, ctypes.c_double]
    lib.tq_decode_attention.restype = ctypes.c_int


_lib: ctypes.CDLL | None = None  # module attributes: tests and benchmarks set them to force the reference
_lib_error: str | None = None


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel (built once per source/machine by :func:`~turboquant.kernels.cbuild.load_c_library`), or None.

    None when ``TURBOQUANT_NO_CEXT=1`` or compiling fails (the reason is logged once and kept in
    :func:`library_error`).
    """
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        _lib = load_c_library(_SOURCE, _declare, what="CPU attention kernel (torch reference used)")
        _lib_error = None if _lib is not None else build_error(_SOURCE)
    return _lib


def library_error() -> str | None:
    """Why the C kernel is not in use (None when it is loaded or not tried yet)."""
    return _lib_error


_NORM_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@lru_cache(maxsize=64)
def _spec(config: QuantizerConfig) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """The 9 spec integers of one quantizer (and the tensors they point to, kept alive)."""
    n_hi, b_hi, n_lo, b_lo = config.bit_split
    keep: list[torch.Tensor] = []

    def group(bits: int) -> tuple[int, int]:
        cent = codebook_tensors(config.dim, bits)[0].contiguous()
        keep.append(cent)
        if 8 % bits:
            return cent.data_ptr(), 0
        table = byte_table(config.dim, bits)
        keep.append(table)
        return cent.data_ptr(), table.data_ptr()

    cent_hi, table_hi = group(b_hi) if n_hi else (0, 0)
    cent_lo, table_lo = group(b_lo)
    bytes_hi = layout(config).streams[0].nbytes if n_hi else 0
    return [n_hi, b_hi, n_lo, b_lo, bytes_hi, cent_hi, cent_lo, table_hi, table_lo], tuple(keep)


@lru_cache(maxsize=64)
def _spec_pair(key_config: QuantizerConfig, value_config: QuantizerConfig) -> tuple[array.array, tuple]:
    """Both specs as one int64 array, and the tensors it points to (kept alive with it)."""
    (k, k_keep), (v, v_keep) = _spec(key_config), _spec(value_config)
    return array.array("q", k + v), (k_keep, v_keep)


@lru_cache(maxsize=64)
def _rotation_matrix(kind: str, dim: int, seed: int) -> torch.Tensor:
    """``Π`` as a contiguous float32 ``(dim, dim)`` tensor (``rotate(x) = Π x``)."""
    return make_rotation(kind, dim, seed).matrix("cpu", torch.float32).contiguous()


def _supported(query: torch.Tensor, keys: QuantizedVectors | None, values: QuantizedVectors | None, hkv: int) -> bool:
    b, hq, l, d = query.shape
    if query.device.type != "cpu" or d > _MAX_DIM or (hq // hkv) * l > MAX_ROWS:
        return False
    if keys is not None and keys.shape[-1]:
        assert values is not None
        if keys.config.variant is not Variant.MSE or values.config.variant is not Variant.MSE:
            return False
        if keys.config.dim != d or values.config.dim != d or keys.codes.device.type != "cpu":
            return False
        if keys.norms.dtype not in _NORM_TYPES or values.norms.dtype not in _NORM_TYPES:
            return False
    return load_library() is not None


def _codes_args(qv: QuantizedVectors, b: int, h: int, n: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Pointer/strides of a code field ``[B, H, N, bytes]`` and its norms ``[B, H, N]`` (9 ints)."""
    codes, norms = qv.codes, qv.norms
    if codes.shape[:3] != (b, h, n):
        codes = codes.expand(b, h, n, codes.shape[-1])
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if norms.shape != (b, h, n):
        norms = norms.expand(b, h, n)
    cs, ns = codes.stride(), norms.stride()
    ints = [codes.data_ptr(), cs[0], cs[1], cs[2], norms.data_ptr(), ns[0], ns[1], ns[2], _NORM_TYPES[norms.dtype]]
    return ints, codes, norms


# Same signature as kernels.reference.torch_quantized_attention (the specification).
def cpu_quantized_attention(
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
) -> torch.Tensor:
    """Attention of ``query`` over compressed tokens followed by full-precision tokens (CPU, compiled C).

    Arguments, shapes and result as :func:`~turboquant.kernels.reference.torch_quantized_attention`
    (``chunk`` is used only by the reference fallback for inputs the kernel does not cover).
    """
    b, hq, l, d, n, w, hkv = attention_shapes(query, keys, values, full_keys, mask)
    if not _supported(query, keys, values, hkv):
        return torch_quantized_attention(
            query, keys, values, full_keys, full_values, scaling, mask, key_offset, value_offset, chunk
        )
    g = hq // hkv
    p = array.array("q", bytes(8 * P_COUNT))
    keep: list[torch.Tensor] = []  # tensors whose pointers are passed: alive until the call returns

    q = query.float().contiguous()
    out = torch.empty((b, hkv, g * l, d), dtype=torch.float32)
    threads = torch.get_num_threads() if (n * b * hkv >= _THREAD_MIN_WORK) else 1
    p[P_B], p[P_HKV], p[P_G], p[P_L], p[P_D], p[P_N], p[P_W] = b, hkv, g, l, d, n, w
    p[P_THREADS], p[P_BLOCK], p[P_Q], p[P_OUT] = threads, BLOCK, q.data_ptr(), out.data_ptr()
    keep += [q, out]
    if n:
        assert keys is not None and values is not None
        kints, *t = _codes_args(keys, b, hkv, n)
        keep += t
        vints, *t = _codes_args(values, b, hkv, n)
        keep += t
        # P_KC..P_KN+4 and P_VC..P_VN+4 are contiguous runs of 9; then the two 9-int specs
        p[P_KC : P_KC + 9] = array.array("q", kints)
        p[P_VC : P_VC + 9] = array.array("q", vints)
        p[P_KSPEC : P_KSPEC + 18] = _spec_pair(keys.config, values.config)[0]
        kcfg, vcfg = keys.config, values.config
        pk = _rotation_matrix(kcfg.rotation.value, d, kcfg.seed)
        pv = _rotation_matrix(vcfg.rotation.value, d, vcfg.seed)
        p[P_PK], p[P_PK + 1] = pk.data_ptr(), pv.data_ptr()
        if key_offset is not None:
            koff = key_offset.float().expand(b, hkv, d).contiguous()
            keep.append(koff)
            p[P_KOFF] = koff.data_ptr()
        if value_offset is not None:
            voff = value_offset.float().expand(b, hkv, d).contiguous()
            keep.append(voff)
            p[P_VOFF] = voff.data_ptr()
    if w:
        assert full_keys is not None and full_values is not None
        fk = full_keys.float()
        fv = full_values.float()
        if fk.shape != (b, hkv, w, d) or fv.shape != (b, hkv, w, d):
            fk, fv = fk.expand(b, hkv, w, d), fv.expand(b, hkv, w, d)
        fk, fv = fk.contiguous(), fv.contiguous()
        keep += [fk, fv]
        p[P_FK], p[P_FV] = fk.data_ptr(), fv.data_ptr()
    if mask is not None:
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.dtype == torch.bool:
            m, kind = m.view(torch.uint8), 0
        else:
            m, kind = m.float(), 1
        m = m.expand(b, hq, l, n + w)
        keep.append(m)
        p[P_MASK], p[P_MASK + 1] = m.data_ptr(), kind
        p[P_MASK + 2], p[P_MASK + 3], p[P_MASK + 4], p[P_MASK + 5] = m.stride()
    lib = _lib
    assert lib is not None
    if lib.tq_decode_attention(p.buffer_info()[0], float(scaling)):
        raise MemoryError("turboquant CPU attention: out of memory")
    del keep
    return out.view(b, hq, l, d).to(query.dtype)


__all__ = ["BLOCK", "MAX_ROWS", "cpu_quantized_attention", "library_error", "load_library"]
