"""Triton kernels against float64 references.

Without a GPU these run the same kernels under ``TRITON_INTERPRET=1`` at small
sizes (the variable must be set before Triton is imported, so this module sets
it at import when CUDA is absent; it only affects Triton). Full-size checks run
on a GPU with ``benchmarks/gpu_decode.py --check``.
"""

from __future__ import annotations

import dataclasses

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from turboquant import QuantizerConfig, TurboQuantMSE, TurboQuantProd  # noqa: E402
from turboquant.kernels import quantize_into, quantized_attention  # noqa: E402
from turboquant.kernels import triton_attention as ta  # noqa: E402
from turboquant.kernels.testing import float64_attention, random_codes, relative_error  # noqa: E402
from turboquant.kernels.triton_encode import triton_quantize_into  # noqa: E402
from turboquant.codec import code_bytes, decode_mse  # noqa: E402
from turboquant.kernels import ptx, triton_combine  # noqa: E402
from turboquant.kernels.tuning import DEFAULT_TUNING  # noqa: E402
from turboquant.quantizer import TurboQuantizer  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 1e-3

# (dim, key bits, value bits, GQA group, batch, compressed N, window W)
ATTENTION_CASES = [
    (128, 4, 4, 4, 1, 300, 16),
    (128, 3, 3, 4, 2, 130, 8),
    (128, 2, 2, 1, 1, 257, 0),
    (128, 4, 3, 8, 1, 64, 5),
    (64, 4, 4, 1, 2, 200, 3),
    (64, 3, 2, 4, 1, 150, 0),
    (64, 2, 4, 8, 1, 1, 4),
    (128, 2.5, 3.5, 4, 1, 100, 7),
    (128, 1, 8, 2, 1, 70, 0),
    (80, 4, 3, 4, 1, 90, 6),
    (96, 3, 4, 1, 1, 45, 2),
    (256, 4, 2, 2, 1, 40, 3),
]


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every partial and output buffer starts as NaN, so an unwritten element fails the check."""

    def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ta, "_empty", empty)
    monkeypatch.setattr(triton_combine, "_empty", empty)  # the output buffer


def _inputs(d, kb, vb, g, b, n, w, *, hkv=2, l=1, seed=0, norm_dtype="float32", capacity=None):
    gen = torch.Generator().manual_seed(seed)
    kcfg = QuantizerConfig(d, kb, seed=3, norm_dtype=norm_dtype)
    vcfg = QuantizerConfig(d, vb, seed=4, norm_dtype=norm_dtype)
    keys = random_codes(kcfg, (b, hkv, n), DEVICE, capacity)
    values = random_codes(vcfg, (b, hkv, n), DEVICE, capacity)
    q = torch.randn(b, hkv * g, l, d, generator=gen).to(DEVICE) * 2
    fk = torch.randn(b, hkv, w, d, generator=gen).to(DEVICE) if w else None
    fv = torch.randn(b, hkv, w, d, generator=gen).to(DEVICE) if w else None
    return q, keys, values, fk, fv


def _check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert torch.isfinite(out).all(), f"{what}: output has NaN/Inf (unwritten or overflow)"
    err = relative_error(out, ref)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL:g}"


@pytest.mark.parametrize("d,kb,vb,g,b,n,w", ATTENTION_CASES)
def test_attention_matches_float64(d, kb, vb, g, b, n, w, poisoned) -> None:
    q, keys, values, fk, fv = _inputs(d, kb, vb, g, b, n, w, seed=d + n)
    out = ta.triton_quantized_attention(q, keys, values, fk, fv, d**-0.5)
    ref = float64_attention(q, keys, values, fk, fv, d**-0.5)
    _check(out, ref, f"d={d} K{kb}/V{vb} G={g} B={b} N={n} W={w}")


def test_attention_mask_offsets_strided_prefill(poisoned) -> None:
    """Float and bool masks, key/value offsets, cache views with capacity > N, L > 1 rows."""
    d, n, w, l = 128, 150, 9, 5
    q, keys, values, fk, fv = _inputs(d, 4, 3, 4, 2, n, w, l=l, capacity=400, norm_dtype="float16")
    ko = torch.randn(2, 2, d, device=DEVICE)
    vo = torch.randn(2, 2, d, device=DEVICE)
    causal = torch.arange(n + w, device=DEVICE)[None, :] <= (torch.arange(l, device=DEVICE)[:, None] + n + w - l)
    bool_mask = causal[None, None].expand(2, 1, l, n + w).clone()
    bool_mask[1, 0, 2, :40] = False
    float_mask = torch.randn(2, 8, l, n + w, device=DEVICE).masked_fill(~bool_mask, float("-inf"))
    for mask in (bool_mask, float_mask):
        out = ta.triton_quantized_attention(q, keys, values, fk, fv, d**-0.5, mask, ko, vo)
        ref = float64_attention(q, keys, values, fk, fv, d**-0.5, mask, ko, vo)
        _check(out, ref, f"mask {mask.dtype}")


def test_attention_edge_cases(poisoned) -> None:
    d = 64
    q, keys, values, fk, fv = _inputs(d, 4, 4, 4, 1, 50, 6)
    # window only, compressed only
    _check(ta.triton_quantized_attention(q, None, None, fk, fv, 0.1), float64_attention(q, None, None, fk, fv, 0.1), "window only")
    _check(ta.triton_quantized_attention(q, keys, values, None, None, 0.1), float64_attention(q, keys, values, None, None, 0.1), "codes only")
    # a fully masked row gives zeros, as in the reference
    mask = torch.ones(1, 8, 1, 56, dtype=torch.bool, device=DEVICE)
    mask[0, 3] = False
    out = ta.triton_quantized_attention(q, keys, values, fk, fv, 0.1, mask)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3]))
    _check(out, float64_attention(q, keys, values, fk, fv, 0.1, mask), "masked row")
    # low-precision query in, same dtype out
    out = ta.triton_quantized_attention(q.to(torch.bfloat16), keys, values, fk.bfloat16(), fv.bfloat16(), 0.1)
    assert out.dtype == torch.bfloat16
    ref = float64_attention(q.to(torch.bfloat16), keys, values, fk.bfloat16(), fv.bfloat16(), 0.1)
    assert relative_error(out, ref) < 1e-2  # bf16 output rounding


def test_real_quantized_data_and_dispatch(poisoned) -> None:
    """Codes from the quantizer (not random bytes) through the public dispatcher with backend='triton'."""
    d, n = 128, 120
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 2, n, d, generator=gen), torch.randn(1, 2, n, d, generator=gen)
    keys, values = TurboQuantMSE(d, 4, seed=1).quantize(k.to(DEVICE)), TurboQuantMSE(d, 2, seed=2).quantize(v.to(DEVICE))
    q = torch.randn(1, 8, 1, d, generator=gen).to(DEVICE)
    out = quantized_attention(q, keys, values, None, None, d**-0.5, backend="triton")
    _check(out, float64_attention(q, keys, values, None, None, d**-0.5), "quantizer codes")


def test_unsupported_falls_back_to_torch() -> None:
    d, n = 64, 40
    x = torch.randn(1, 2, n, d, device=DEVICE)
    keys = TurboQuantProd(d, 3).quantize(x)
    values = TurboQuantMSE(d, 3).quantize(x)
    q = torch.randn(1, 4, 1, d, device=DEVICE)
    assert not ta.triton_supports(q, keys, values)
    out = ta.triton_quantized_attention(q, keys, values, None, None, 0.125)
    ref = quantized_attention(q, keys, values, None, None, 0.125, backend="torch")
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("d,bits,norm_dtype", [(128, 4, "float32"), (128, 3, "float16"), (64, 2, "float32"), (128, 2.5, "float32"), (80, 3.5, "float32"), (96, 8, "float32")])
def test_encode_matches_quantizer(d, bits, norm_dtype) -> None:
    cfg = QuantizerConfig(d, bits, seed=5, norm_dtype=norm_dtype)
    r, cap, t, start = 3, 90, 41, 17
    x = torch.randn(r, t, d, generator=torch.Generator().manual_seed(d)).to(DEVICE) * 3
    x[0, 0] = 0  # zero vector: norm 0, codes of 0
    codes = torch.full((r, cap, code_bytes(cfg)), 0xA5, dtype=torch.uint8, device=DEVICE)
    norms = torch.full((r, cap), float("nan"), dtype=getattr(torch, norm_dtype), device=DEVICE)
    out = triton_quantize_into(x, cfg, codes, norms, start)
    ref = TurboQuantizer.from_config(cfg).quantize(x)
    same = (decode_mse(out.codes, cfg) == decode_mse(ref.codes, cfg)).float().mean().item()
    assert same >= 0.999, f"only {same:.5f} of codes identical"
    rel = ((out.norms.float() - ref.norms.float()).abs() / ref.norms.float().clamp_min(1e-30)).max().item()
    assert rel <= (1e-6 if norm_dtype == "float32" else 1e-3)
    # nothing outside [start, start + t) was touched
    assert (codes[:, :start] == 0xA5).all() and (codes[:, start + t :] == 0xA5).all()
    assert torch.isnan(norms[:, :start].float()).all() and torch.isnan(norms[:, start + t :].float()).all()


@pytest.mark.parametrize(
    "variant",
    [{"encode_bucket": 0, "encode_programs_per_sm": 0}, {"encode_bucket": 1}, {"encode_bucket": 2, "encode_programs_per_sm": 1}, {"encode_dots": 1}, {"encode_dots": 3}],
)
@pytest.mark.parametrize("bits", [4, 3, 2, 1, 2.5])
def test_encode_variants_match_quantizer(bits, variant) -> None:
    """Every bucketize mode, rotation precision and the persistent grid give the quantizer's codes (several token blocks per program)."""
    tuning = dataclasses.replace(DEFAULT_TUNING, encode_block_t=16, **variant)
    cfg = QuantizerConfig(64, bits, seed=9)
    x = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x[1, 5] = 0
    codes = torch.zeros(2, 80, code_bytes(cfg), dtype=torch.uint8, device=DEVICE)
    norms = torch.zeros(2, 80, device=DEVICE)
    out = triton_quantize_into(x, cfg, codes, norms, 4, tuning=tuning)
    ref = TurboQuantizer.from_config(cfg).quantize(x)
    assert (decode_mse(out.codes, cfg) == decode_mse(ref.codes, cfg)).float().mean().item() >= 0.999
    torch.testing.assert_close(out.norms, ref.norms)


def test_encode_dispatch_torch_and_triton_agree() -> None:
    cfg = QuantizerConfig(64, 4)
    x = torch.randn(2, 4, 10, 64, device=DEVICE)
    bufs = [(torch.zeros(2, 4, 32, code_bytes(cfg), dtype=torch.uint8, device=DEVICE), torch.zeros(2, 4, 32, device=DEVICE)) for _ in range(2)]
    a = quantize_into(x, cfg, *bufs[0], start=3, backend="torch")
    b = quantize_into(x, cfg, *bufs[1], start=3, backend="triton")
    assert a.shape == b.shape == torch.Size([2, 4, 10])
    assert (a.codes == b.codes).float().mean() >= 0.99


@pytest.mark.parametrize(
    "variant",
    [{"prefetch": True}, {"lut": 0, "precise": False}, {"lut": 1}, {"dotk": False}, {"precise": True}, {"block_n": 32, "programs_per_sm": 1}, {"block_n": 16, "num_warps": 1}],
)
def test_attention_tuning_variants(variant, poisoned) -> None:
    """Every tuning the GPU benchmark sweeps computes the same function."""
    tuning = dataclasses.replace(DEFAULT_TUNING, **variant)
    q, keys, values, fk, fv = _inputs(128, 4, 3, 4, 1, 200, 5, seed=11)
    out = ta.triton_quantized_attention(q, keys, values, fk, fv, 0.09, tuning=tuning)
    _check(out, float64_attention(q, keys, values, fk, fv, 0.09), str(variant))


def _run_ptx(asm: str, inputs: dict[str, int], n_out: int) -> list[int]:
    """Tiny interpreter for the b32 PTX subset of the register decoders (returns the fp16 output bit patterns)."""
    regs: dict[str, int] = dict(inputs)
    outs: dict[str, int] = {}
    mask = 0xFFFFFFFF

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    def prmt(a: int, b: int, c: int) -> int:
        pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):
            sel = (c >> 4 * i) & 0xF
            byte = pool[sel & 7]
            if sel & 8:
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << 8 * i
        return out

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            lo_hi, src = rest.split("},")
            lo, hi = (t.strip() for t in lo_hi.strip("{ ").split(","))
            outs[lo], outs[hi] = regs[src.strip()] & 0xFFFF, regs[src.strip()] >> 16
            continue
        d, *args = (t.strip() for t in rest.split(","))
        v = [val(a) for a in args]
        regs[d] = {
            "mov.b32": lambda: v[0],
            "not.b32": lambda: ~v[0] & mask,
            "shr.u32": lambda: v[0] >> v[1],
            "shl.b32": lambda: (v[0] << v[1]) & mask,
            "and.b32": lambda: v[0] & v[1],
            "or.b32": lambda: v[0] | v[1],
            "xor.b32": lambda: v[0] ^ v[1],
            "mul.lo.u32": lambda: (v[0] * v[1]) & mask,
            "mad.lo.u32": lambda: (v[0] * v[1] + v[2]) & mask,
            "shf.r.wrap.b32": lambda: (((v[1] << 32) | v[0]) >> (v[2] & 31)) & mask,
            "prmt.b32": lambda: prmt(*v),
        }[op]()
    return [outs[f"${i}"] for i in range(n_out)]


def _fp16_table(d: int, bits: int):
    import numpy as np

    from turboquant.codebook import lloyd_max_codebook

    return np.asarray(lloyd_max_codebook(d, bits).centroids, dtype=np.float16).view(np.uint16)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_prmt4_decoder_is_bit_exact(d) -> None:
    """The inline-PTX 4-bit decoder (GPU only) gives exactly the fp16 centroid of each nibble."""
    import numpy as np

    table = _fp16_table(d, 4)
    asm = ptx.prmt4_asm(d)
    rng = np.random.default_rng(d)
    words = [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98] + [int(w) for w in rng.integers(0, 2**32, 300, dtype=np.uint64)]
    for w in words:
        expected = [int(table[(w >> 4 * k) & 15]) for k in range(8)]
        assert _run_ptx(asm, {"$8": w}, 8) == expected, hex(w)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_prmt2_decoder_is_bit_exact(d) -> None:
    """The 2-bit register decoder: one word of sixteen codes → their fp16 centroids, in order."""
    import numpy as np

    table = _fp16_table(d, 2)
    asm = ptx.prmt2_asm(d)
    rng = np.random.default_rng(d + 1)
    words = [0, 0xFFFFFFFF, 0xE4E4E4E4, 0x1B1B1B1B] + [int(w) for w in rng.integers(0, 2**32, 300, dtype=np.uint64)]
    for w in words:
        expected = [int(table[(w >> 2 * k) & 3]) for k in range(16)]
        assert _run_ptx(asm, {"$16": w}, 16) == expected, hex(w)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_prmt3_decoder_is_bit_exact(d) -> None:
    """The 3-bit register decoder on every group alignment of a 12-byte stream (as the kernel feeds it)."""
    import numpy as np

    table = _fp16_table(d, 3)
    asm = ptx.prmt3_asm(d)
    rng = np.random.default_rng(d + 2)
    streams = [0, (1 << 96) - 1, int.from_bytes(bytes(range(12)), "little")]
    streams += [int.from_bytes(rng.integers(0, 256, 12, dtype=np.uint8).tobytes(), "little") for _ in range(150)]
    for st in streams:
        words = [(st >> (32 * i)) & 0xFFFFFFFF for i in range(3)] + [0]
        for g in range(4):  # group g: bytes 3g .. 3g + 2 of the stream
            wi, sh = 3 * g // 4, (3 * g % 4) * 8
            expected = [int(table[(st >> (24 * g + 3 * k)) & 7]) for k in range(8)]
            assert _run_ptx(asm, {"$8": words[wi], "$9": words[wi + 1], "$10": sh}, 8) == expected, (hex(st), g)


@pytest.mark.parametrize("bits", [4, 3, 2.5])
def test_cache_buffer_fused_encode_matches_torch(bits: float) -> None:
    """The KV cache's flush writes codes in place through the fused encode; growth keeps old codes."""
    from turboquant.kvstore import KVCodes

    cfg = QuantizerConfig(64, bits, norm_dtype="float16")
    gen = torch.Generator().manual_seed(7)
    chunks = [torch.randn(2, 3, t, 64, generator=gen).to(DEVICE) for t in (40, 1, 250)]  # crosses the 256 growth step
    fused, reference = KVCodes(cfg), KVCodes(cfg)
    for x in chunks:
        fused.encode_append(x, "triton", norm_correction=False)
        reference.encode_append(x, "torch", norm_correction=False)
    a, b = fused.view(), reference.view()
    assert a.shape == (2, 3, 291) and fused.buffer.capacity >= 291
    assert (a.codes != b.codes).float().mean().item() < 1e-3  # ties at bucket edges may round differently
    torch.testing.assert_close(a.norms, b.norms)


def test_cuda_tuning_variants_are_checked_and_normalised() -> None:
    """CudaTuning.variant: four ints get the default register cap (0) appended; anything else names the field."""
    from turboquant.config import TurboQuantError
    from turboquant.kernels.tuning import CudaTuning

    assert CudaTuning(variant=(8, 2, 0, 1)).variant == (8, 2, 0, 1, 0)
    assert CudaTuning(variant=[8, 1, 3, 1, 2]).variant == (8, 1, 3, 1, 2)
    for bad in ((8, 2, 0), (8, 2, 0, 1, 2, 3), (8, 2, -1, 1), (8, 2, True, 1), (8.0, 2, 0, 1)):
        with pytest.raises(TurboQuantError, match="CudaTuning.variant"):
            CudaTuning(variant=bad)
