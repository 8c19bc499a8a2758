"""The index's ``torch`` engine: exact scores of every stored vector from its decoded codes, any device.

Codes are decoded a chunk at a time (a chunk of ``(n, code_bytes)`` rows from the caller, which may
rebuild them from split storage) and multiplied with the rotated query batch; the running top-k is
merged chunk by chunk, so memory stays at one decoded chunk whatever ``n``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..codec import decode_mse, reconstruction_norms
from ..config import QuantizerConfig
from ..rotation import RandomRotation


def torch_search(
    q: torch.Tensor, k: int, n: int, config: QuantizerConfig, rotation: RandomRotation,
    code_rows: Callable[[int, int], torch.Tensor], norms: torch.Tensor, l2: bool, correction: bool, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Exact top-``k`` ``(scores, positions)``, each ``(nq, k)``, of queries ``q`` ``(nq, dim)`` over ``n`` vectors.

    Score ``<Πq, ŷ>·s`` with ``s = ‖x‖/‖ŷ‖`` (``correction``) or ``‖x‖``; for ``l2`` the squared
    distance ``‖q‖² + ‖x‖² − 2<q, x>`` (ascending). ``code_rows(a, b)`` gives stored rows ``a..b``
    and ``norms`` ``(n,)`` the stored norms.
    """
    if q.shape[0] == 0:
        return torch.empty(0, k, device=q.device), torch.empty(0, k, dtype=torch.int64, device=q.device)
    q_rot = rotation.rotate(q)
    q_sq = q.square().sum(1, keepdim=True)
    nq = q.shape[0]
    best_keys = torch.full((nq, 0), -float("inf"), device=q.device)
    best_pos = torch.zeros((nq, 0), dtype=torch.int64, device=q.device)
    for start in range(0, n, chunk):
        y_hat = decode_mse(code_rows(start, min(n, start + chunk)).to(q.device), config)
        nrm = norms[start : start + chunk].float()
        dots = (q_rot @ y_hat.T) * (nrm / reconstruction_norms(y_hat) if correction else nrm)
        keys = 2 * dots - nrm.square() - q_sq if l2 else dots  # larger is better: -(‖q‖² + ‖x‖² − 2<q, x>)
        pos = torch.arange(start, start + y_hat.shape[0], device=q.device).expand(nq, -1)
        keys, pos = torch.cat([best_keys, keys], 1), torch.cat([best_pos, pos], 1)
        top = torch.topk(keys, min(k, keys.shape[1]), dim=1)
        best_keys, best_pos = top.values, torch.gather(pos, 1, top.indices)
    return (-best_keys if l2 else best_keys), best_pos


__all__ = ["torch_search"]
