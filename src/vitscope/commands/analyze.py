"""`vitscope analyze`: every analysis on every model, written to a results directory with a report.

``--out`` is checked and locked before any model loads; the run is written aside (``.DIR.partial/``, with
checkpoints for ``--resume``) and committed whole (see :mod:`vitscope.rundir`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vitscope.analyses import ALL_ANALYSES, AnalysisConfig, analyze
from vitscope.commands.common import (
    ROLE_NAMES,
    CommandError,
    add_spectrum_groups_argument,
    check_roles,
    device_name,
    non_negative_float,
    non_negative_int,
    positive_int,
    require_device,
    set_threads,
    skipped_summary,
    verdict_and_report,
)
from vitscope.commands.runs import (
    add_run_arguments,
    analyze_into,
    commit_run,
    finished_run_note,
    identity_of,
    open_run,
    report_after_commit,
)
from vitscope.distributed import DistEnv, all_sum, init_distributed
from vitscope.models import parse_spec
from vitscope.results import RunDirectory
from vitscope.rundir import RunWriter, new_run_id


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="LABEL=SPEC",
        help="a model to analyse: a model spec KIND:TARGET as in every command, named LABEL= for the report, "
        "e.g. mae=mae:mae_pretrain_vit_base.pth or random=random:vit_small_patch16_224 "
        "(repeatable; LABEL= may be left out: then the file or model name)",
    )
    parser.add_argument("--data", required=True, help="data spec: fashion-mnist[:DIR], folder:DIR, ...")
    parser.add_argument(
        "--out",
        required=True,
        help="run directory: written aside and committed whole when the run is complete; a finished run is "
        "replaced only with --overwrite",
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=512, help="test images for the metrics (default: %(default)s)"
    )
    parser.add_argument(
        "--probe-images",
        type=positive_int,
        default=2000,
        help="train images for the linear probes (default: %(default)s)",
    )
    parser.add_argument(
        "--noise-images", type=positive_int, default=256, help="test images scored under noise (default: %(default)s)"
    )
    parser.add_argument(
        "--noise-norm",
        type=non_negative_float,
        default=0.5,
        help="noise RMS per input value in the model's normalised input space (default: %(default)s)",
    )
    add_spectrum_groups_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="cpu, cuda, cuda:N, mps or auto (under torchrun, cuda is each process's own GPU)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="forward pass precision; bf16/fp16 autocast, every metric still accumulated in float32/64 (default: fp32)",
    )
    parser.add_argument(
        "--metrics", default=None, help=f"comma-separated analyses (default: all): {','.join(ALL_ANALYSES)}"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the image choice, probes and t-SNE")
    parser.add_argument("--probe-epochs", type=positive_int, default=100, help="epochs of each linear probe")
    parser.add_argument(
        "--attention-images",
        type=non_negative_int,
        default=3,
        help="test images whose per-head attention maps are kept for the report's explorer (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's own); 1 is fastest on a busy shared machine",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="data loader worker processes per process (default: 0 on the CPU, up to 8 on a GPU)",
    )
    roles = parser.add_argument_group("claims (optional): which model plays which part")
    roles.add_argument("--cl", help="label of the contrastive model")
    roles.add_argument("--mim", help="label of the masked-image-modeling model")
    roles.add_argument("--control", help="label of an untrained model of the same architecture")
    roles.add_argument("--hybrid", help="label of the CL+MIM hybrid")
    parser.add_argument("--no-report", action="store_true", help="write results only, no figures or HTML")
    add_run_arguments(parser)


def parse_models(items: list[str]) -> dict[str, str]:
    """``LABEL=SPEC`` items to an ordered mapping; a bare spec is labelled by its file or model name."""
    models: dict[str, str] = {}
    for item in items:
        label, sep, spec = item.partition("=")
        if not sep or ":" in label:  # no label given: "mae:PATH" or "random:NAME"
            label, spec = parse_spec(item).label, item
        if not label or not spec:
            raise CommandError(f"--model {item!r}: expected LABEL=SPEC")
        if label in models:
            raise CommandError(f"--model {item!r}: label {label!r} used twice")
        models[label] = spec
    return models


def roles_of(args: argparse.Namespace, labels: list[str]) -> dict[str, str]:
    roles = {name: getattr(args, name) for name in ROLE_NAMES if getattr(args, name)}
    check_roles(roles, labels)
    return roles


def _print_note(note: str) -> None:
    print(f"note: {note}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    models = parse_models(args.model)
    roles = roles_of(args, list(models))
    analyses = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    require_device(args.device)
    set_threads(args.threads)
    env = init_distributed(args.device)  # one process, or the group torchrun describes
    config = AnalysisConfig(
        num_images=args.num_images,
        probe_train_images=args.probe_images,
        noise_images=args.noise_images,
        batch_size=args.batch_size,
        device=str(env.device),
        precision=args.precision,
        seed=args.seed,
        analyses=analyses,
        probe_epochs=args.probe_epochs,
        attention_images=args.attention_images,
        num_workers=args.workers,
        noise_relative_norm=args.noise_norm,
        spectrum_groups=args.spectrum_groups,
    )
    config.wanted()  # unknown analysis names fail before any model is loaded
    identity = identity_of(models, args.data, config)
    writer, checkpoint = _open_out(args, identity, env)
    printed: list[str] = []

    def notify(note: str) -> None:
        printed.append(note)
        _print_note(note)

    try:
        if writer is not None and writer.finished:
            print(finished_run_note(writer, identity))
            return 0
        if writer is None:  # another process of a torchrun group: rank 0 writes the run directory
            analyze(models, args.data, config, roles=roles)
            return 0
        output = analyze_into(writer, checkpoint, models, args.data, config, roles=roles, notify=notify)
        assert output is not None  # rank 0
        output.results.meta["roles"] = roles
        if checkpoint is not None and checkpoint.restored:
            output.results.meta["resumed"] = checkpoint.restored
        run_id = checkpoint.run_id if checkpoint is not None and checkpoint.run_id else new_run_id()
        commit_run(writer, output, run_id)
        meta = output.results.meta
        print(
            f"analysed {len(models)} model(s) on {meta['num_images']} images of {args.data} "
            f"in {meta['wall_time_s']:.1f} s; {skipped_summary(meta['skipped'])}"
        )
        for note in meta["notes"]:
            if note not in printed:
                _print_note(note)
        print(f"results: {writer.path / RunDirectory.METRICS_CSV} (run {run_id})")
        report_after_commit(writer.path, lambda: verdict_and_report(writer.path, roles, render=not args.no_report))
        return 0
    finally:
        if writer is not None:
            writer.close()


def _open_out(args: argparse.Namespace, identity: dict, env: DistEnv) -> tuple[RunWriter | None, Any]:
    """Rank 0 checks and takes ``--out`` before any work; under torchrun the others learn whether there is work
    (they stop quietly when rank 0 refused, having said why, or found the run finished). Checkpoints are kept
    by one-process runs only."""
    writer = checkpoint = None
    status = 0  # 0: work to do, 1: refused, 2: finished already
    if env.is_main:
        try:
            writer, checkpoint = open_run(args, identity)
        except BaseException:
            all_sum(1, env)
            raise
        status = 2 if writer.finished else 0
    status = all_sum(status, env)
    if status == 1:
        raise SystemExit(2)
    if status == 2 and not env.is_main:
        raise SystemExit(0)
    if env.world > 1:
        if env.is_main and args.resume:
            print("note: under torchrun the analysis keeps no checkpoints; --resume starts it again", file=sys.stderr)
        checkpoint = None
    return writer, checkpoint
