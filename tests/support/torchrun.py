"""The start of a torchrun command line for tests: two processes on this machine, on a free port."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` processes on 127.0.0.1; append the script or ``-m MOD``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]  # fmt: skip
