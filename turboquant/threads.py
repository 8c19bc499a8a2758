"""How turboquant uses CPU threads: row chunks in parallel, each chunk's ops single-threaded.

The CPU encode and the Hadamard rotation run many small torch ops (butterflies, table lookups,
packing) per row chunk. With torch's intra-op threads every one of those ops splits across all
cores and waits at a barrier; on a machine where another process holds a core, each wait can
cost a scheduler quantum (measured: a d=1536 encode at 2 threads ran 5-15x slower than at 1
thread on a shared 2-core machine). Instead, :func:`run_chunks` hands whole row chunks to a pool
of ``torch.get_num_threads()`` workers whose own intra-op threads are set to 1 (a per-thread
setting), so the default thread count is used without oversubscription and without barriers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)  # this worker thread only


@lru_cache(maxsize=8)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="turboquant-rows", initializer=_single_threaded_worker)


def run_chunks(fn: Callable[[int], None], starts: Iterable[int]) -> None:
    """Call ``fn(start)`` for every chunk start, in parallel over ``torch.get_num_threads()`` workers.

    ``fn`` must write disjoint outputs. Inside a worker (one intra-op thread) the chunks run inline,
    so nested calls never wait on the pool they run in.
    """
    starts = list(starts)
    workers = torch.get_num_threads()
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            fn(start)
        return
    # grad mode and inference mode are thread-local: workers run under the caller's
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(start: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(start)

    for _ in _pool(workers).map(run, starts):  # re-raises the first exception of a chunk
        pass


__all__ = ["run_chunks"]
