"""Package trained runs as bundled models: weights + a model card with a linear-probe score.

    python scripts/package_bundled.py [RUNS_DIR] [--dest src/vitscope/bundled] [--names moco simmim mae hybrid]

For each run directory RUNS_DIR/NAME (written by `vitscope pretrain`): copies encoder.safetensors to
DEST/NAME.safetensors and writes DEST/NAME.json with the exact command, seed, steps, wall time,
hardware, final loss and the per-layer linear-probe accuracy on Fashion-MNIST. Also scores an
untrained model of the same architecture (the `random` control) for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from vitscope.analyses import FeatureBank, ProbeConfig, linear_probe, run_reducers
from vitscope.capture import make_capture
from vitscope.data import build_transform, make_loader, open_dataset
from vitscope.io import write_json_atomic
from vitscope.models import load_model

PROBE_TRAIN, PROBE_TEST = 5000, 2000


def probe_accuracy(model: torch.nn.Module, seed: int = 0) -> dict[str, list[float]]:
    """Per-layer linear-probe top-1 (%) on Fashion-MNIST, CLS and GAP features."""
    capture = make_capture(model)
    transform = build_transform(model)
    banks = {}
    for split, count in (("train", PROBE_TRAIN), ("test", PROBE_TEST)):
        bank = FeatureBank()
        loader = make_loader(
            open_dataset("fashion-mnist", split, transform), num_images=count, batch_size=256, seed=seed
        )
        run_reducers(capture, loader, [bank], progress=f"probe features ({split})")
        banks[split] = bank
    rows, _ = linear_probe(banks["train"], banks["test"], "model", config=ProbeConfig(seed=seed), progress=None)
    out: dict[str, list[float]] = {}
    for row in sorted(rows, key=lambda r: r["layer"]):
        out.setdefault(row["feature"], []).append(round(row["value"], 2))
    return out


def training_seconds(log: Path, batch_size: int) -> float:
    """Seconds spent training, from the log's per-step images/s (exact across kills and resumes).

    Every logged line covers the steps since the previous one at its reported throughput; a resumed
    run truncates the log to the resumed step, so no step is counted twice.
    """
    total, previous = 0.0, None
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        rate = record.get("images_per_s")
        if previous is not None and rate:
            total += (record["step"] - previous) * batch_size / rate
        previous = record["step"]
    return total


def read_commands(path: Path) -> dict[str, str]:
    """The last command each run was started with (``NAME<TAB>COMMAND`` lines of the training script)."""
    if not path.exists():
        return {}
    root = f"{Path(__file__).resolve().parents[1]}/"  # paths inside the repository are written relative to it
    return dict(line.replace(root, "").split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)


def last_log_line(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def hardware(runs_at_once: int) -> str:
    """Where the training script runs: this machine's CPU, one thread per run, ``runs_at_once`` runs at a time."""
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.machine(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.machine()
    )
    return (
        f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), no GPU; one thread per training run "
        f"(OMP_NUM_THREADS=1), {runs_at_once} runs at a time at the lowest priority (scripts/train_bundled.sh); "
        f"torch {torch.__version__}"
    )


def schedule(run_dir: Path) -> dict:
    """The run's planned length (steps, epochs, batch) from its train state; how far it got."""
    state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    config, position = state["config"], state["data_position"]
    total = state["scheduler"]["total_steps"] if state.get("scheduler") else None
    per_epoch = position["steps_per_epoch"]
    return {
        "batch_size": config["batch_size"],
        "lr": config["lr"],
        "planned_steps": total,
        "planned_epochs": None if total is None else round(total / per_epoch, 2),
        "steps_done": state["step"],
        "epochs_done": round(state["step"] / per_epoch, 2),
        "complete": total is not None and state["step"] >= total,
    }


def package(run_dir: Path, dest: Path, name: str, command: str, runs_at_once: int) -> dict:
    info = json.loads((run_dir / "encoder.json").read_text())
    final = last_log_line(run_dir / "log.jsonl")
    plan = schedule(run_dir)
    model = load_model(f"file:{run_dir / 'encoder.safetensors'}", arch=info["arch"], **info["arch_kwargs"])
    card = {
        "name": name,
        "method": info.get("method"),
        "arch": info["arch"],
        "arch_kwargs": info["arch_kwargs"],
        "mean": info.get("mean"),
        "std": info.get("std"),
        "trained_with": "vitscope pretrain",
        "command": command,
        "seed": info.get("seed", 0),
        "steps": info.get("step"),
        "schedule": plan,
        "images_seen": None if info.get("step") is None else info["step"] * plan["batch_size"],
        "wall_time_s": round(training_seconds(run_dir / "log.jsonl", plan["batch_size"]), 1),
        "wall_time_note": f"time in training steps, summed over resumed sessions, while sharing the "
        f"{os.cpu_count()} cores with the script's other runs ({runs_at_once} at a time) and other work",
        "hardware": hardware(runs_at_once),
        "final_loss": final.get("loss"),
        "final_log": final,
        "data": "Fashion-MNIST train split (60,000 images, 28x28 grayscale expanded to 3 channels)",
        "linear_probe_top1": probe_accuracy(model),
        "linear_probe_protocol": f"per-layer linear probes on {PROBE_TRAIN} train / {PROBE_TEST} test images, "
        "BatchNorm-standardised features, vitscope.probes defaults, seed 0",
        "packaged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    shutil.copyfile(run_dir / "encoder.safetensors", dest / f".{name}.safetensors.tmp")
    (dest / f".{name}.safetensors.tmp").replace(dest / f"{name}.safetensors")
    write_json_atomic(dest / f"{name}.json", card)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", default="runs/bundled")
    parser.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / "src/vitscope/bundled"))
    parser.add_argument("--names", nargs="+", default=["moco", "simmim", "mae", "hybrid"])
    parser.add_argument("--runs-at-once", type=int, default=2, help="training runs that shared the CPU (the card says)")
    args = parser.parse_args(argv)
    runs, dest = Path(args.runs), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)  # a --dest for a pilot's card need not exist yet
    commands = read_commands(runs / "commands.tsv")
    for name in args.names:
        if not (runs / name / "encoder.safetensors").exists():
            print(f"{name}: no encoder.safetensors in {runs / name}; skipped", file=sys.stderr)
            continue
        card = package(runs / name, dest, name, commands.get(name, ""), args.runs_at_once)
        probe = card["linear_probe_top1"]
        print(
            f"{name}: step {card['steps']}, final loss {card['final_loss']:.4f}, "
            f"last-layer probe cls {probe.get('cls', ['-'])[-1]} / gap {probe['gap'][-1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
