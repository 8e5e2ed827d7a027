"""Run-time helpers: thread limits for small numeric work.

Small problems (a few hundred t-SNE points, linear probes on [L, n, C] features) gain nothing from
several threads and lose a lot to them on a busy machine: OpenMP and torch's intra-op threads spin
while they wait. :func:`single_threaded` runs such work on one thread and restores the settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Limit torch's intra-op threads and the BLAS/OpenMP pools to 1 inside the block; restore after."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)
