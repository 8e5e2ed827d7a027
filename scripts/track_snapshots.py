"""Late-layer metrics of every encoder snapshot of pretraining runs, as learning curves.

    python scripts/track_snapshots.py RUNS_DIR [--names moco simmim ...] [--images 256] [--curves CSV] [--plot PNG]

For each run RUNS_DIR/NAME written by ``vitscope pretrain --keep-every N`` it loads every
``snapshots/step-NNNNNNN/encoder.safetensors`` (``file:`` spec, strict) and measures attention
distance, NMI, attention entropy, token cosine, effective rank (every pair of images) and the
high-frequency Fourier Δ on the same Fashion-MNIST test images in one pass
(``vitscope.analyses.analyze_model``). It writes the curves file (``--curves``, default
RUNS_DIR/curves.csv): one row per (run, epoch, metric) with the mean over the late blocks (the last
third) and over the early blocks (the first third; empty where only the late mean was recorded). An
untrained model of the same architecture is measured too (run ``random``, epoch 0). Snapshots
already in the curves file with every metric are not measured again, and its rows of runs that are
no longer on disk are kept: the repository's ``docs/figures/learning_curves.csv`` carries the curves
across machines, since run directories stay out of git. ``--plot`` draws the curves against epochs.

This keeps the bundled models' curves file (and so docs/reproduction.md's tables) on its own images;
for any other runs use ``vitscope curves RUN [RUN ...]`` (docs/tracking.md), which reads the runs'
``--track-every`` records or measures their kept encoders afresh, with the training-time measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import torch

from vitscope.analyses import analyze_model
from vitscope.data import build_transform, make_loader, open_dataset
from vitscope.io import write_text_atomic
from vitscope.models import load_model, read_card

METRICS = ("attention_distance", "nmi", "attention_entropy", "token_cosine", "effective_rank", "fourier_high")
FIELDS = ("run", "step", "epoch", "metric", "early", "late")


def measure(spec: str, images: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """(early, late) means of each metric for the model ``spec`` names."""
    model = load_model(spec)
    loader = make_loader(open_dataset("fashion-mnist", "test", build_transform(model)), num_images=images,
                         batch_size=128, seed=seed)  # fmt: skip
    results = analyze_model(model, loader, label="m", metrics=list(METRICS), spectrum_groups=None, progress=None)
    depth = len(model.blocks)
    third = max(1, depth // 3)
    early, late = range(1, third + 1), range(depth - third + 1, depth + 1)
    out = {}
    for metric in METRICS:
        per_layer = {r["layer"]: r["value"] for r in results.rows if r["metric"] == metric and r["head"] is None}
        out[metric] = (sum(per_layer[i] for i in early) / len(early), sum(per_layer[i] for i in late) / len(late))
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict]) -> None:
    lines = [",".join(FIELDS)] + [",".join(str(row[f]) for f in FIELDS) for row in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def steps_per_epoch(run: Path) -> float:
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("epoch"):
            return record["step"] / record["epoch"]
    raise ValueError(f"{run}/log.jsonl has no epoch field")


def track(runs_dir: Path, names: list[str], images: int, path: Path) -> list[dict]:
    rows = read_rows(path)
    measured: dict[tuple[str, int], set[str]] = {}
    for r in rows:
        measured.setdefault((r["run"], int(r["step"])), set()).add(r["metric"])
    done = {key for key, metrics in measured.items() if metrics >= set(METRICS)}
    rows = [r for r in rows if (r["run"], int(r["step"])) in done]  # re-measure snapshots missing a metric
    for name in names:
        run = runs_dir / name
        snapshots = sorted((run / "snapshots").glob("step-*/encoder.safetensors"))
        if not snapshots:
            continue
        per_epoch = steps_per_epoch(run)
        if ("random", 0) not in done:
            card = read_card(snapshots[0].with_name("encoder.json"))
            options = "&".join(f"{k}={v}" for k, v in card["arch_kwargs"].items())
            for metric, (early, late) in measure(f"random:{card['arch']}?{options}&seed=0", images).items():
                rows.append({"run": "random", "step": 0, "epoch": 0.0, "metric": metric, "early": early, "late": late})
            done.add(("random", 0))
        for weights in snapshots:
            step = int(weights.parent.name.split("-")[1])
            if (name, step) in done:
                continue
            for metric, (early, late) in measure(f"file:{weights}", images).items():
                rows.append({"run": name, "step": step, "epoch": round(step / per_epoch, 3), "metric": metric,
                             "early": early, "late": late})  # fmt: skip
            done.add((name, step))
            write_rows(path, rows)
            print(f"{name} step {step}: measured", flush=True)
    write_rows(path, rows)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure

    titles = {
        "attention_distance": "attention distance (px)",
        "nmi": "NMI",
        "attention_entropy": "row entropy (nats)",
        "token_cosine": "token cosine",
        "effective_rank": "effective rank",
        "fourier_high": "high-frequency Δ log amplitude",
    }
    figure = Figure(figsize=(10.5, 6.0), layout="constrained")
    axes = list(figure.subplots(2, 3).flat)
    found = [r for r in dict.fromkeys(row["run"] for row in rows) if r != "random"]
    order = ("moco", "simmim", "mae", "hybrid")  # the same colour for a model in every figure
    runs = [r for r in order if r in found] + [r for r in found if r not in order]
    for ax, metric in zip(axes, METRICS):
        for run in runs:
            points = sorted(
                (float(r["epoch"]), float(r["late"])) for r in rows if r["run"] == run and r["metric"] == metric
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=run)
        control = [float(r["late"]) for r in rows if r["run"] == "random" and r["metric"] == metric]
        if control:
            ax.axhline(control[0], color="0.4", linestyle="--", linewidth=1, label="untrained")
        if metric == "attention_entropy":
            ax.axhline(math.log(49), color="0.7", linestyle=":", linewidth=1, label="log N")
        ax.set_title(f"late blocks: {titles[metric]}", fontsize=9)
        ax.set_xlabel("epoch")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8, loc="center right")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--names", nargs="+", default=["moco", "simmim", "mae", "hybrid"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curves", type=Path, default=None, help="curves CSV to extend (default: RUNS_DIR/curves.csv)")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = track(args.runs_dir, args.names, args.images, args.curves or args.runs_dir / "curves.csv")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
