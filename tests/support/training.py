"""Command lines of tiny real training runs (a 2-block 16 px ViT on the bundled Fashion-MNIST subset)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def pretrain_args(out: Path, *extra: str, method: str = "mae", steps: int = 4, save_every: int = 2) -> list[str]:
    """``vitscope pretrain`` arguments of a tiny run (one thread: CPU sums depend on the thread count)."""
    return [
        "pretrain",
        "--method",
        method,
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(TINY_KWARGS),
        "--data",
        "fashion-mnist-subset",
        "--num-images",
        "96",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--save-every",
        str(save_every),
        "--moco-dim",
        "32",
        "--moco-mlp-dim",
        "64",
        "--decoder-dim",
        "32",
        "--decoder-depth",
        "1",
        "--decoder-heads",
        "2",
        "--no-progress",
        "--seed",
        "3",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def finetune_args(model: str, out: Path, *extra: str) -> list[str]:
    """``vitscope finetune`` arguments of a tiny run: 2 epochs of 8 steps."""
    return [
        "finetune",
        "--model",
        model,
        "--data",
        "fashion-mnist-subset",
        "--num-images",
        "64",
        "--num-test-images",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]
