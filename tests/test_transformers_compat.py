"""The installed transformers lies in the supported range, stated once in pyproject.toml and
checked against ``turboquant.cache.TRANSFORMERS_RANGE``; the cache API the cache relies on exists."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from turboquant import cache as tq_cache  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_states_the_cache_range() -> None:
    spec = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', PYPROJECT.read_text())
    assert spec, "pyproject.toml must pin transformers as 'transformers>=X,<Y' in the hf extra"
    assert spec.groups() == tq_cache.TRANSFORMERS_RANGE, (
        f"pyproject.toml says transformers>={spec[1]},<{spec[2]}, turboquant.cache.TRANSFORMERS_RANGE says {tq_cache.TRANSFORMERS_RANGE}"
    )


def test_installed_transformers_is_supported() -> None:
    lo, hi = tq_cache.TRANSFORMERS_RANGE
    assert tq_cache.transformers_supported(), (
        f"transformers {transformers.__version__} is outside the supported range >={lo},<{hi} "
        f"(pyproject.toml [project.optional-dependencies] hf): pip install 'transformers>={lo},<{hi}'"
    )


@pytest.mark.parametrize(("version", "ok"), [("5.3.0", False), ("5.4.0", True), ("5.23.0", True), ("5.30.0.dev0", True), ("6.0.0", False), ("4.57.6", False)])
def test_range_check(version: str, ok: bool) -> None:
    assert tq_cache.transformers_supported(version) is ok


def test_cache_api_the_cache_relies_on() -> None:
    from transformers import AttentionInterface
    from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert issubclass(DynamicLayer, CacheLayerMixin) and issubclass(DynamicSlidingWindowLayer, DynamicLayer)
    for name in ("lazy_initialization", "update", "get_seq_length", "get_mask_sizes", "reset", "crop", "batch_repeat_interleave", "batch_select_indices"):
        assert hasattr(DynamicLayer, name), f"transformers {transformers.__version__}: DynamicLayer.{name} is gone"
    params = inspect.signature(sdpa_mask).parameters
    missing = {"batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask"} - set(params)
    assert not missing, f"transformers {transformers.__version__}: sdpa_mask lacks {sorted(missing)} (the mask hook forwards them)"
    assert tq_cache.ATTENTION_NAME in AttentionInterface._global_mapping
    assert tq_cache.ATTENTION_NAME in AttentionMaskInterface._global_mapping
