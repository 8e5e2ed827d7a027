"""`vitscope demo`: the papers' analyses on the bundled CL / MIM / hybrid models and an untrained control.

Analyses ``bundled:moco``, ``bundled:simmim``, ``bundled:mae``, ``bundled:hybrid`` and ``random`` (the same
architecture, untrained) on Fashion-MNIST test images, writes ``runs/demo/`` (metrics, figures,
report.html), prints the per-layer linear probes and the claims verdict (CL = moco, MIM = simmim; saved in
``claims.json`` and shown in the report), and the same findings judged with MAE as the MIM model, since
the papers' MIM covers both (saved and shown beside them). A rerun replaces the earlier demo run whole
(``--resume`` continues a stopped one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitscope.analyses import AnalysisConfig
from vitscope.analyses.checkpoint import DEFAULT_EVERY, SuiteCheckpoint
from vitscope.commands.common import (
    CommandError,
    add_spectrum_groups_argument,
    device_name,
    non_negative_int,
    positive_int,
    require_device,
    verdict_and_report,
)
from vitscope.commands.runs import analyze_into, commit_run, report_after_commit
from vitscope.distributed import init_distributed
from vitscope.models import cards
from vitscope.results import Results
from vitscope.rundir import RunWriter, new_run_id

BUNDLED_NAMES = ("moco", "simmim", "mae", "hybrid")
ROLES = {"cl": "moco", "mim": "simmim", "control": "random", "hybrid": "hybrid"}
SECOND_MIM = "mae"  # the findings are judged again with this model as MIM (saved in claims.json's "others")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="results directory (default: %(default)s)")
    parser.add_argument("--data", default="fashion-mnist", help="data spec (default: %(default)s)")
    parser.add_argument("--num-images", type=positive_int, default=500, help="test images (default: %(default)s)")
    parser.add_argument(
        "--probe-images", type=positive_int, default=2000, help="probe train images (default: %(default)s)"
    )
    parser.add_argument("--noise-images", type=positive_int, default=250, help="test images scored under noise")
    add_spectrum_groups_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=125, help="images per forward pass")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the image choice, probes and t-SNE")
    parser.add_argument(
        "--resume", action="store_true", help="continue a stopped demo run in --out instead of starting again"
    )


def demo_models() -> dict[str, str]:
    """label -> spec: the bundled models and an untrained control of their architecture."""
    missing = [name for name in BUNDLED_NAMES if name not in cards.available()]
    if missing:
        raise CommandError(
            f"bundled models missing: {', '.join(missing)} (looked in {cards.BUNDLED_DIR}); "
            "train them with scripts/train_bundled.sh"
        )
    card = cards.find("moco")
    options = "&".join(f"{key}={value}" for key, value in card.arch_kwargs.items())
    models = {name: f"bundled:{name}" for name in BUNDLED_NAMES}
    models["random"] = f"random:{card.arch}?{options}&seed=0"
    return models


def probe_table(results: Results, labels: list[str]) -> str:
    """Per-layer linear-probe top-1 of every model (CLS features where the model has them)."""
    depths = sorted({row["layer"] for row in results.select(metric="linear_probe_top1")})
    lines = ["linear probe top-1 (%) per layer, cls token:", "model    " + "".join(f"{d:>7}" for d in depths)]
    for label in labels:
        values = {
            row["layer"]: row["value"] for row in results.select(metric="linear_probe_top1", model=label, feature="cls")
        }
        lines.append(f"{label:<9}" + "".join(f"{values.get(d, float('nan')):>7.1f}" for d in depths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    models = demo_models()
    require_device(args.device)
    config = AnalysisConfig(
        num_images=args.num_images,
        probe_train_images=args.probe_images,
        noise_images=args.noise_images,
        batch_size=args.batch_size,
        device=str(init_distributed(args.device).device),
        seed=args.seed,
        spectrum_groups=args.spectrum_groups,
    )
    out_dir = Path(args.out)
    with RunWriter(out_dir, overwrite=not args.resume, resume=args.resume) as writer:  # a rerun replaces it whole
        if writer.finished:
            print(f"{out_dir} already holds a finished demo run; nothing to resume (run without --resume to redo it)")
            return 0
        checkpoint = SuiteCheckpoint(writer.checkpoint_dir, DEFAULT_EVERY, run_id=new_run_id())
        output = analyze_into(writer, checkpoint, models, args.data, config, "demo", roles=ROLES, notify=_print_note)
        assert output is not None  # one process
        output.results.meta["roles"] = ROLES
        commit_run(writer, output, checkpoint.run_id or new_run_id())
        _print_and_report(output.results, list(models), out_dir)
    return 0


def _print_note(note: str) -> None:
    print(f"note: {note}", file=sys.stderr)


def _print_and_report(results: Results, labels: list[str], out_dir: Path) -> None:
    """The probes, the verdict (CL = moco, MIM = simmim), the same findings with MAE in one line (both
    saved in claims.json), and the one-line summary with the report's path last."""
    print(probe_table(results, labels))
    print(
        f"analysed {len(labels)} models on {results.meta['num_images']} Fashion-MNIST test images "
        f"in {results.meta['wall_time_s']:.0f} s"
    )
    report_after_commit(out_dir, lambda: verdict_and_report(out_dir, dict(ROLES), render=True, other_mims=[SECOND_MIM]))
