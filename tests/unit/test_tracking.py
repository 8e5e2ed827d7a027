"""Training you can watch: ``--track-every`` measures without changing the run, resumes with it, and its
TensorBoard scalars read back as logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vitscope.pretrain.trainer as trainer
from tests.support.training import finetune_args, pretrain_args
from vitscope.cli import main
from vitscope.pretrain.tracking import (
    SPREAD_FLOOR,
    TENSORBOARD_DIR,
    embedding_spread,
    held_out_images,
    knn_top1,
    measure_encoder,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _weights(run: Path, name: str = "encoder.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def _interrupt_then_resume(monkeypatch, args: list[str], at_step: int, resume_extra: tuple[str, ...] = ()) -> None:
    """``vitscope pretrain ARGS`` stopped by Ctrl-C in optimizer step ``at_step`` (exit 130), then resumed."""
    real, calls = trainer.backward_and_step, {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(trainer, "backward_and_step", interrupted)
    assert main(args) == 130
    monkeypatch.setattr(trainer, "backward_and_step", real)
    assert main([*args, "--resume", *resume_extra]) == 0


def _track_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "track"]


@pytest.mark.parametrize("method", ["moco", "simmim", "mae", "hybrid"])
def test_tracking_leaves_the_weights_bit_identical(tmp_path: Path, method: str) -> None:
    assert main(pretrain_args(tmp_path / "plain", method=method, steps=4)) == 0
    assert main(pretrain_args(tmp_path / "tracked", "--track-every", "2", method=method, steps=4)) == 0
    plain, tracked = _weights(tmp_path / "plain"), _weights(tmp_path / "tracked")
    assert plain.keys() == tracked.keys()
    assert all(torch.equal(plain[k], tracked[k]) for k in plain)
    state = [torch.load(tmp_path / r / "train_state.pt", weights_only=True) for r in ("plain", "tracked")]
    assert torch.equal(state[0]["rng"]["torch"], state[1]["rng"]["torch"])
    assert [r["trained_steps"] for r in _track_records(tmp_path / "tracked")] == [0, 2, 4]
    assert not _track_records(tmp_path / "plain")


def test_finetune_tracking_leaves_the_model_bit_identical(tmp_path: Path) -> None:
    assert main(pretrain_args(tmp_path / "enc", method="mae", steps=2)) == 0
    spec = f"file:{tmp_path / 'enc'}"
    assert main(finetune_args(spec, tmp_path / "plain")) == 0
    assert main(finetune_args(spec, tmp_path / "tracked", "--track-every", "4")) == 0  # drop-path draws from the RNG
    plain, tracked = (
        _weights(tmp_path / "plain", "model.safetensors"),
        _weights(tmp_path / "tracked", "model.safetensors"),
    )
    assert all(torch.equal(plain[k], tracked[k]) for k in plain)
    records = _track_records(tmp_path / "tracked")
    assert [r["trained_steps"] for r in records] == [0, 4, 8, 12, 16]
    assert all(0.0 <= r["metrics"]["knn_top1"] <= 1.0 for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tracked" / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    top1 = json.loads((tmp_path / "tracked" / "metrics.json").read_text())["top1_per_epoch"]
    assert [(s.step, s.value) for s in events.Scalars("eval/top1")] == [
        (8 * (i + 1), pytest.approx(a)) for i, a in enumerate(top1)
    ]


def test_resumed_tracking_reads_back_from_tensorboard_as_logged(tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = pretrain_args(run, "--track-every", "2", method="simmim", steps=6, save_every=2)
    _interrupt_then_resume(monkeypatch, args, at_step=6)

    records = _track_records(run)
    assert [r["trained_steps"] for r in records] == [0, 2, 4, 6]  # step 4 measured once, before the interruption
    events = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("knn_top1", "attention_entropy/late", "effective_rank/block2", "embedding_spread"):
        scalars = events.Scalars(f"track/{key}")
        assert [s.step for s in scalars] == [0, 2, 4, 6]
        logged = [r["metrics"][key] for r in records]
        assert [s.value for s in scalars] == pytest.approx(logged, rel=1e-6)
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    # the last record equals an independent measurement of the saved encoder
    from vitscope.analyses import analyze_model
    from vitscope.models import load_model

    encoder = load_model(f"file:{run}")
    images, labels = held_out_images("fashion-mnist-subset", 512, 3, 16, (0.5,) * 3, (0.5,) * 3)
    rows = analyze_model(
        encoder, [(images[:64], labels[:64])], label="m", metrics=["attention_entropy", "effective_rank"],
        spectrum_groups=None, progress=None,
    ).rows  # fmt: skip
    last = records[-1]["metrics"]
    for row in rows:
        if row["head"] is None and row["layer"] >= 1:
            assert last[f"{row['metric']}/block{row['layer']}"] == pytest.approx(row["value"], rel=1e-9)


def test_knn_and_spread_against_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centres = torch.randn(4, 8, generator=generator)
    features = centres[labels] + 0.3 * torch.randn(40, 8, generator=generator)
    x = torch.nn.functional.normalize(features, dim=-1)
    bank, query = torch.arange(0, 40, 2), torch.arange(1, 40, 2)
    nearest = (x[query] @ x[bank].T).topk(3, dim=-1).indices
    votes = torch.stack([torch.bincount(labels[bank][n], minlength=4) for n in nearest])
    expected = float((votes.argmax(-1) == labels[query]).float().mean())
    assert knn_top1(features, labels, k=3) == pytest.approx(expected)
    assert knn_top1(features, torch.full((40,), -1)) is None

    spread = np.asarray(x, dtype=np.float64).std(axis=0, ddof=1).mean() * math.sqrt(8)
    assert embedding_spread(features) == pytest.approx(spread)
    assert embedding_spread(torch.ones(10, 8) + 1e-9 * torch.randn(10, 8, generator=generator)) < SPREAD_FLOOR


def test_collapsed_embeddings_warn_naming_metric_and_threshold() -> None:
    import timm

    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                num_heads=2, num_classes=0)  # fmt: skip
    with torch.no_grad():
        encoder.norm.weight.zero_()  # every embedding becomes the norm's bias: one direction
        encoder.norm.bias.fill_(1.0)
    encoder.train()
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    values, warnings = measure_encoder(encoder, images, torch.arange(16) % 2, metric_images=8)
    assert encoder.training and all(m.training for m in encoder.modules())
    assert values["embedding_spread"] < SPREAD_FLOOR
    assert any(w.startswith("embedding collapse: embedding_spread") and f"< {SPREAD_FLOOR}" in w for w in warnings)
    assert any("attention_entropy ≥ 0.98·log N" in w for w in warnings)  # untrained: near uniform


def test_tracking_switched_on_at_resume_measures_from_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    args = pretrain_args(run, method="mae", steps=4, save_every=2)
    _interrupt_then_resume(monkeypatch, args, at_step=4, resume_extra=("--track-every", "2"))
    assert [r["trained_steps"] for r in _track_records(run)] == [2, 4]
