"""`vitscope pretrain`: MoCo v3, SimMIM, MAE or the hybrid (1 − λ)·MIM + λ·CL on a timm ViT.

Single process: ``vitscope pretrain ...``; data parallel: ``torchrun --nproc_per_node=K -m vitscope
pretrain ...`` (NCCL on GPUs, gloo on CPU; ``--batch-size`` is per process).
"""

from __future__ import annotations

import argparse
import sys

from vitscope.commands.common import (
    CommandError,
    ModelKwargs,
    add_tracking_arguments,
    add_warmup_arguments,
    device_name,
    finite_float,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    require_device,
    set_threads,
)
from vitscope.models import parse_spec

OPEN_FRACTION = finite_float(0.0, 1.0, low_open=True, high_open=True)  # a share strictly between 0 and 1
AREA_FRACTION = finite_float(0.0, 1.0, low_open=True)  # a crop's area share: (0, 1]


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument(
        "--method",
        required=True,
        choices=["moco", "simmim", "mae", "hybrid"],
        help="objective: MoCo v3 (CL), SimMIM or MAE (MIM), or the hybrid of CL and MIM",
    )
    g.add_argument(
        "--mim", default="simmim", choices=["simmim", "mae"], help="MIM half of the hybrid (default: %(default)s)"
    )
    g.add_argument(
        "--cl-weight", type=fraction, default=0.2, help="λ of the hybrid: (1−λ)·L_MIM + λ·L_CL (default: %(default)s)"
    )
    g.add_argument(
        "--model",
        default="random:vit_tiny_patch16_224",
        metavar="SPEC",
        help="the untrained timm ViT to pretrain, as a model spec random:NAME[?k=v&...] (a bare NAME means the "
        "same; the spec's options go to timm.create_model, under --model-kwargs)",
    )
    g.add_argument(
        "--model-kwargs",
        action=ModelKwargs,
        help="options for timm.create_model, as key=value items (img_size=28 patch_size=4 depth=6) or a JSON object",
    )
    g.add_argument("--data", default="fashion-mnist", help="data spec; its train split is used (default: %(default)s)")
    g.add_argument(
        "--num-images", type=positive_int, default=None, help="train on a stratified subset of this many images"
    )
    g.add_argument(
        "--epochs",
        type=positive_float,
        default=None,
        help="passes over the training images; with --resume, more than before extends a finished run",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="optimizer steps (overrides --epochs); with --resume, more than before extends a finished run",
    )
    g.add_argument("--batch-size", type=positive_int, default=256, help="per process (default: %(default)s)")
    g.add_argument(
        "--out", required=True, help="run directory (encoder.safetensors, encoder.json, train_state.pt, log.jsonl)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its train_state.pt (also past its end: give more --epochs/--steps)",
    )
    g.add_argument("--save-every", type=positive_int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument(
        "--keep-every",
        type=positive_int,
        default=None,
        help="also keep the encoder every N steps under OUT/snapshots/step-NNNNNNN/ (loadable with file:)",
    )
    add_tracking_arguments(g, subject="encoder")
    g.add_argument(
        "--track-data",
        default=None,
        help="data spec of the held-out images when tracking (default: --data's test split; a folder: spec "
        "has no splits, so give the held-out folder here)",
    )
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights, batches and masks")
    g.add_argument(
        "--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast: auto = bf16 on CUDA, fp32 on CPU (default: %(default)s)",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress (a live bar on a terminal, a line every 30 s in a log)"
    )
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's own); 1 is fastest on a busy shared machine. "
        "Bit-identical resumption on CPU needs the same thread count",
    )
    o = parser.add_argument_group("optimizer")
    o.add_argument(
        "--lr", type=positive_float, default=None, help="peak learning rate (default: --blr × global batch / 256)"
    )
    o.add_argument(
        "--blr", type=positive_float, default=1.5e-4, help="base learning rate per 256 images (default: %(default)s)"
    )
    o.add_argument("--min-lr", type=non_negative_float, default=0.0, help="learning rate at the end of the cosine")
    o.add_argument(
        "--weight-decay", type=non_negative_float, default=None, help="default: 0.1 for moco, 0.05 otherwise"
    )
    add_warmup_arguments(o, default="10%% of the steps")
    o.add_argument(
        "--clip-grad", type=non_negative_float, default=3.0, help="max gradient norm; 0 disables (default: %(default)s)"
    )
    m = parser.add_argument_group("objective")
    m.add_argument("--moco-dim", type=positive_int, default=256, help="MoCo: output dimension of the projector")
    m.add_argument("--moco-mlp-dim", type=positive_int, default=1024, help="MoCo: hidden dimension of its MLPs")
    m.add_argument("--moco-t", type=positive_float, default=0.2, help="temperature τ (default: %(default)s)")
    m.add_argument("--moco-m", type=fraction, default=0.99, help="MoCo: initial momentum, rising to 1 by cosine")
    m.add_argument("--freeze-patch-embed", action="store_true", help="MoCo v3's frozen random patch projection")
    m.add_argument("--mask-ratio", type=OPEN_FRACTION, default=None, help="in (0, 1); default: 0.6 SimMIM, 0.75 MAE")
    m.add_argument(
        "--mask-patch-size",
        type=positive_int,
        default=None,
        help="SimMIM mask cell in pixels (default: the patch size)",
    )
    m.add_argument(
        "--no-norm-pix-loss", action="store_true", help="MAE: raw instead of per-patch normalised pixel targets"
    )
    m.add_argument(
        "--simmim-head-depth",
        type=non_negative_int,
        default=0,
        help="SimMIM: 0 = the official linear pixel head; N = N blocks (--decoder-dim/--decoder-heads) before it",
    )
    m.add_argument("--decoder-dim", type=positive_int, default=128, help="MAE (and SimMIM's block head): width")
    m.add_argument("--decoder-depth", type=positive_int, default=2, help="MAE: decoder blocks")
    m.add_argument("--decoder-heads", type=positive_int, default=4, help="MAE (and SimMIM's block head): heads")
    m.add_argument(
        "--crop-min-scale",
        type=AREA_FRACTION,
        default=None,
        help="random resized crop's lower area bound, in (0, 1] (default: the method's own)",
    )


def build_config(args: argparse.Namespace):
    from vitscope.pretrain import ObjectiveConfig, TrainConfig

    objective = ObjectiveConfig(
        method=args.method,
        mim=args.mim,
        cl_weight=args.cl_weight,
        moco_dim=args.moco_dim,
        moco_mlp_dim=args.moco_mlp_dim,
        moco_t=args.moco_t,
        moco_m=args.moco_m,
        freeze_patch_embed=args.freeze_patch_embed,
        mask_ratio=args.mask_ratio,
        mask_patch_size=args.mask_patch_size,
        norm_pix_loss=not args.no_norm_pix_loss,
        decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads,
        simmim_head_depth=args.simmim_head_depth,
        crop_min_scale=args.crop_min_scale,
    )
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.1 if args.method == "moco" else 0.05)
    arch, options = architecture(args.model)
    return TrainConfig(
        arch=arch,
        model_kwargs={**options, **args.model_kwargs},  # --model-kwargs win over the spec's options
        data=args.data,
        num_images=args.num_images,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        blr=args.blr,
        min_lr=args.min_lr,
        weight_decay=weight_decay,
        warmup_steps=args.warmup_steps,
        warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad or None,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        out=args.out,
        save_every=args.save_every,
        keep_every=args.keep_every,
        track_every=args.track_every,
        track_images=args.track_images,
        track_data=args.track_data,
        resume=args.resume,
        progress=not args.no_progress,
        objective=objective,
    )


def architecture(spec: str) -> tuple[str, dict]:
    """``--model`` of pretrain as (timm name, timm options): ``random:NAME[?k=v&...]`` or a bare timm ``NAME``
    (``timm:NAME`` of older runs is kept as it was: its weights are never loaded); other kinds are refused."""
    kind, sep, _ = spec.partition(":")
    if not sep:
        return spec, {}
    if kind in ("random", "timm"):
        parsed = parse_spec(spec)
        if "seed" in parsed.options:
            raise CommandError(f"--model {spec}: pretraining is seeded by --seed, not by the spec's seed=")
        return (parsed.target if kind == "random" else f"timm:{parsed.target}"), dict(parsed.options)
    raise CommandError(
        f"--model {spec}: pretrain starts from an untrained timm architecture; give random:NAME "
        "(e.g. random:vit_tiny_patch16_224); to train further from weights, use finetune"
    )


def check_training_device(name: str) -> None:
    """Training runs on cpu or cuda, and only on a device this machine has (checked before any work)."""
    if name.startswith("mps"):
        raise CommandError(f"--device {name}: training runs on cpu or cuda")
    require_device(name)


def run(args: argparse.Namespace) -> int:
    from vitscope.pretrain import pretrain

    check_training_device(args.device)
    config = build_config(args)
    set_threads(args.threads)
    try:
        result = pretrain(config)
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the checkpoint kept named
        print(f"vitscope pretrain: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    if result.env.is_main:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a (already complete)"
        print(
            f"pretrain {config.objective.method}: {result.step} steps, last loss {last}; "
            f"encoder at {result.out / 'encoder.safetensors'}"
        )
    return 0
