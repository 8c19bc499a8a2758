"""The CUDA decode kernel's in-warp Hadamard rotation (``rows_hadamard`` in cuda_attention.cu), on the CPU.

The kernel rotates the query rows and rotates the value accumulator back with Walsh-Hadamard butterflies
from two stages of sign bits (``hadamard_sign_words``) when the rotation allows it. These tests emulate its
lanes and shuffles exactly as written there (lane ``l`` holds coordinates ``[E*l, E*l + E)``) and compare with
:class:`RandomRotation` in float64: a wrong sign word, bit order, butterfly partner or stage order fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboquant import QuantizerConfig
from turboquant.kernels.cuda_attention import hadamard_sign_words
from turboquant.rotation import make_rotation


def _lane_signs(words: tuple[int, ...], d: int) -> np.ndarray:
    """sw[stage][lane] of the kernel: the lane's E bits of each stage, at bit 0."""
    e = d // 32
    out = np.zeros((2, 32), dtype=np.int64)
    for st in range(2):
        for lane in range(32):
            out[st, lane] = (words[4 * st + (e * lane) // 32] >> ((e * lane) % 32)) & ((1 << e) - 1)
    return out


def _emulate(x: np.ndarray, words: tuple[int, ...], inverse: bool) -> np.ndarray:
    """rows_hadamard for one row x [d] (float64), scale 1/d."""
    d = x.shape[0]
    e = d // 32
    sw = _lane_signs(words, d)
    v = x.reshape(32, e).copy()  # v[lane][e]

    def flip(st: int) -> None:
        for k in range(e):
            neg = (sw[st] >> k) & 1
            v[:, k] = np.where(neg == 1, -v[:, k], v[:, k])

    def butterflies() -> None:
        h = 1
        while h < e:
            for k in range(e):
                if k & h == 0:
                    a, b = v[:, k].copy(), v[:, k + h].copy()
                    v[:, k], v[:, k + h] = a + b, a - b
            h *= 2
        lanes = np.arange(32)
        m = 1
        while m < 32:
            other = v[lanes ^ m]  # __shfl_xor_sync(v, m)
            v[:] = np.where(((lanes & m) != 0)[:, None], other - v, v + other)
            m *= 2

    if not inverse:
        flip(0)
    butterflies()
    flip(1)
    butterflies()
    if inverse:
        flip(0)
    return v.reshape(d) / d


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_butterflies_equal_the_rotation(d: int, seed: int) -> None:
    cfg = QuantizerConfig(d, 4, seed=seed)
    words = hadamard_sign_words(cfg)
    assert words is not None and len(words) == 8
    rot = make_rotation(cfg.rotation, d, seed)
    x = np.random.default_rng(seed).standard_normal((3, d))
    want_rot = rot.rotate(torch.from_numpy(x)).numpy()
    want_un = rot.unrotate(torch.from_numpy(x)).numpy()
    for i in range(3):
        np.testing.assert_allclose(_emulate(x[i], words, inverse=False), want_rot[i], rtol=0, atol=1e-12)
        np.testing.assert_allclose(_emulate(x[i], words, inverse=True), want_un[i], rtol=0, atol=1e-12)


def test_sign_words_hold_each_stage_once() -> None:
    cfg = QuantizerConfig(128, 3, seed=5)
    words = hadamard_sign_words(cfg)
    signs = make_rotation(cfg.rotation, 128, 5).signs
    for st in range(2):
        bits = [(words[4 * st + c // 32] >> (c % 32)) & 1 for c in range(128)]
        assert bits == [int(s < 0) for s in signs[st]]
    # d = 64: the upper two words of each stage stay empty
    w64 = hadamard_sign_words(QuantizerConfig(64, 4, seed=5))
    assert w64[2] == w64[3] == w64[6] == w64[7] == 0


def test_dense_rotations_keep_the_matrix_path() -> None:
    """Haar (and non-power-of-two d, three stages) have no sign words: the kernel multiplies by the matrix."""
    assert hadamard_sign_words(QuantizerConfig(128, 4, rotation="haar")) is None
    assert hadamard_sign_words(QuantizerConfig(96, 4)) is None
