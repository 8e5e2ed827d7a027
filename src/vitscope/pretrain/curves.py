"""Learning curves of training runs: the tracked values against the number of optimizer steps.

A run directory gives its curve one of two ways:

- ``log.jsonl`` track records (``vitscope pretrain/finetune --track-every N``, :mod:`.tracking`): read as
  they are; the record after 0 steps is the run's untrained control;
- kept encoders (``--keep-every N``: ``snapshots/step-NNNNNNN/``, plus the final ``encoder.safetensors``)
  measured afresh with the same measurement (:func:`.tracking.measure_encoder`) on the held-out
  images the card's data and seed name; the control is a randomly initialised model of the same
  architecture (``random:`` spec, seed 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunCurve", "read_run", "log_points", "snapshot_points", "tidy_rows"]

SNAPSHOT_GLOB = "snapshots/step-*/encoder.safetensors"


@dataclass
class RunCurve:
    """One run's points ``{"trained_steps", "epoch", "metrics": {key: value}}`` in step order, and its
    untrained control's values (None when unknown)."""

    name: str
    path: Path
    source: str  # "log" or "snapshots"
    points: list[dict[str, Any]] = field(default_factory=list)
    control: dict[str, float] | None = None


def _log_records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    records = []
    lines = log.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the torn last line of a run killed mid-write
                break
            raise ValueError(f"{log}: line {number} is not JSON") from None
    return records


def log_points(run: Path) -> list[dict[str, Any]]:
    """The track records of ``run/log.jsonl`` as points, one per step count (the last one written wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in _log_records(run):
        if record.get("kind") == "track" and isinstance(record.get("metrics"), dict):
            done = int(record["trained_steps"])
            by_step[done] = {"trained_steps": done, "epoch": record.get("epoch"), "metrics": record["metrics"]}
    return [by_step[k] for k in sorted(by_step)]


def _steps_per_epoch(run: Path) -> float | None:
    for record in _log_records(run):
        if record.get("kind") is None and record.get("epoch") and record.get("step"):
            return float(record["step"]) / float(record["epoch"])
    return None


def _measure(spec: str, card: dict, images: int) -> dict[str, float]:
    from vitscope.models import load_model
    from vitscope.pretrain.tracking import held_out_images, measure_encoder

    model = load_model(spec)
    size = int(model.patch_embed.img_size[0])  # type: ignore[index, union-attr]
    mean, std = tuple(card.get("mean", (0.5,) * 3)), tuple(card.get("std", (0.5,) * 3))
    pixels, labels = held_out_images(card.get("data", "fashion-mnist"), 512, int(card.get("seed", 0)), size, mean, std)
    return measure_encoder(model, pixels, labels, metric_images=images)[0]


def snapshot_points(run: Path, images: int = 64) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The kept encoders of ``run`` (and its final one) measured afresh, and a random model's values."""
    from vitscope.models import read_card

    weights = sorted(run.glob(SNAPSHOT_GLOB))
    if (run / "encoder.safetensors").is_file():
        weights.append(run / "encoder.safetensors")
    per_epoch = _steps_per_epoch(run)
    points: dict[int, dict[str, Any]] = {}
    card: dict = {}
    for path in weights:
        card = read_card(path.with_name("encoder.json"))
        done = int(card["step"])
        if done in points:
            continue
        metrics = _measure(f"file:{path}", card, images)
        points[done] = {"trained_steps": done, "epoch": done / per_epoch if per_epoch else None, "metrics": metrics}
    options = "&".join(f"{k}={v}" for k, v in card["arch_kwargs"].items())
    control = _measure(f"random:{card['arch']}?{options}&seed=0", card, images)
    return [points[k] for k in sorted(points)], control


def read_run(run: Path, name: str, images: int = 64) -> RunCurve:
    """A run's curve from its log's track records, else from its kept encoders measured afresh."""
    if not run.is_dir():
        raise ValueError(f"{run}: not a run directory")
    points = log_points(run)
    if points:
        control = points[0]["metrics"] if points[0]["trained_steps"] == 0 else None
        return RunCurve(name, run, "log", points, control)
    if any(run.glob(SNAPSHOT_GLOB)):
        points, control = snapshot_points(run, images)
        return RunCurve(name, run, "snapshots", points, control)
    raise ValueError(
        f"{run}: no track records in log.jsonl (train with --track-every N) and no kept encoders in "
        "snapshots/ (train with --keep-every N)"
    )


def tidy_rows(curves: list[RunCurve]) -> list[dict[str, Any]]:
    """One row per (run, step count, value): run, source, trained_steps, epoch, key, value; the control
    as trained_steps "control" where it was measured apart from the run (snapshots)."""
    rows = []
    for curve in curves:
        for point in curve.points:
            for key, value in point["metrics"].items():
                rows.append(
                    {
                        "run": curve.name,
                        "source": curve.source,
                        "trained_steps": point["trained_steps"],
                        "epoch": point["epoch"],
                        "key": key,
                        "value": value,
                    }
                )
        if curve.source == "snapshots" and curve.control is not None:
            for key, value in curve.control.items():
                rows.append(
                    {
                        "run": curve.name,
                        "source": "random",
                        "trained_steps": "control",
                        "epoch": None,
                        "key": key,
                        "value": value,
                    }
                )
    return rows
