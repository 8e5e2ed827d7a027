"""Two processes under torchrun (gloo, CPU): identical weights, global contrastive batch, disjoint shards."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from tests.support.torchrun import torchrun

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from vitscope.pretrain.objectives import ObjectiveConfig
    from vitscope.pretrain.trainer import TrainConfig, pretrain

    out = sys.argv[1]
    cfg = TrainConfig(
        arch="vit_tiny_patch16_224",
        model_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        data="fashion-mnist-subset", num_images=64, steps=3, batch_size=4, lr=1e-3, save_every=100,
        out=out + "/run", progress=False,
        objective=ObjectiveConfig(method="hybrid", mim="simmim", moco_dim=16, moco_mlp_dim=32),
    )
    result = pretrain(cfg)
    rank = result.env.rank
    params = {k: v.detach().clone() for k, v in result.objective.named_parameters()}
    torch.save(params, f"{out}/params{rank}.pt")
    shards = [result.plan.indices(step, rank).tolist() for step in range(3)]
    info = {"rank": rank, "world": result.env.world, "logits_shape": list(result.objective.last_logits_shape),
            "shards": shards, "losses": result.losses}
    with open(f"{out}/info{rank}.json", "w") as fh:
        json.dump(info, fh)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_gloo_processes_train_one_model_on_a_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [*torchrun(), str(script), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    infos = [json.loads((tmp_path / f"info{r}.json").read_text()) for r in range(2)]
    assert [i["world"] for i in infos] == [2, 2]
    assert all(i["logits_shape"] == [4, 8] for i in infos)  # local queries × global keys
    assert infos[0]["losses"] == infos[1]["losses"]  # the logged loss is the all-reduced mean
    for step in range(3):
        a, b = set(infos[0]["shards"][step]), set(infos[1]["shards"][step])
        assert len(a) == len(b) == 4 and not a & b
    p0, p1 = (torch.load(tmp_path / f"params{r}.pt", weights_only=True) for r in range(2))
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    start = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert start["step"] == 3 and (tmp_path / "run" / "encoder.safetensors").exists()
    # training moved the shared encoder (the test would pass trivially on frozen weights otherwise)
    from vitscope.pretrain.objectives import ObjectiveConfig, build_objective

    torch.manual_seed(0)
    fresh = build_objective(
        "vit_tiny_patch16_224",
        {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        ObjectiveConfig(method="hybrid", mim="simmim", moco_dim=16, moco_mlp_dim=32),
    )
    assert not torch.equal(fresh.encoder.blocks[0].attn.qkv.weight, p0["encoder.blocks.0.attn.qkv.weight"])
