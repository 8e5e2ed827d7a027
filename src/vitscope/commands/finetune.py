"""`vitscope finetune`: fine-tune a pretrained encoder end to end; test top-1 after every epoch.

``--model`` is any model spec (``vitscope.models.load_model``); ``file:RUN`` or
``file:RUN/encoder.safetensors`` loads a ``vitscope pretrain`` run through the ``encoder.json`` beside it.
Data parallel with ``torchrun --nproc_per_node=K -m vitscope finetune ...``.
"""

from __future__ import annotations

import argparse
import sys

from vitscope.commands.common import (
    ModelKwargs,
    add_tracking_arguments,
    add_warmup_arguments,
    device_name,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    set_threads,
)
from vitscope.commands.pretrain import AREA_FRACTION, check_training_device

BELOW_ONE = finite_float(0.0, 1.0, high_open=True)  # [0, 1)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="the encoder to fine-tune, a model spec as in every command, e.g. file:runs/moco "
        "(a pretrain run) or timm:vit_tiny_patch16_224",
    )
    parser.add_argument(
        "--model-kwargs",
        action=ModelKwargs,
        help="options for the model loader, as key=value items (drop_rate=0.1) or a JSON object",
    )
    parser.add_argument(
        "--data", default="fashion-mnist", help="data spec; train split for training (default: %(default)s)"
    )
    parser.add_argument(
        "--test-data", default=None, help="data spec scored after each epoch (default: --data's test split)"
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=None, help="stratified subset of the training images"
    )
    parser.add_argument(
        "--num-test-images", type=positive_int, default=None, help="stratified subset of the test images"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=10, help="epochs; with --resume, more than before extends a finished run"
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per process (default: %(default)s)")
    parser.add_argument(
        "--lr", type=positive_float, default=None, help="peak learning rate (default: --blr × global batch / 256)"
    )
    parser.add_argument("--blr", type=positive_float, default=1e-3, help="base learning rate per 256 images")
    parser.add_argument(
        "--layer-decay", type=AREA_FRACTION, default=0.75, help="layer-wise lr decay (default: %(default)s)"
    )
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--label-smoothing", type=BELOW_ONE, default=0.1, help="label smoothing, in [0, 1)")
    add_warmup_arguments(parser, default="1 epoch")
    parser.add_argument(
        "--min-lr", type=non_negative_float, default=1e-6, help="learning rate at the end of the cosine"
    )
    parser.add_argument("--clip-grad", type=non_negative_float, default=3.0, help="max gradient norm; 0 disables")
    parser.add_argument("--drop-path", type=BELOW_ONE, default=0.1, help="stochastic depth rate, in [0, 1)")
    parser.add_argument(
        "--crop-min-scale", type=AREA_FRACTION, default=0.35, help="random resized crop's lower area bound, in (0, 1]"
    )
    parser.add_argument("--out", required=True, help="run directory (model.safetensors, model.json, train_state.pt)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its train_state.pt (also past its end: give more --epochs)",
    )
    parser.add_argument("--save-every", type=positive_int, default=500, help="checkpoint every N steps")
    add_tracking_arguments(parser, subject="model")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the head, batches and crops")
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="autocast: auto = bf16 on CUDA"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress (a live bar on a terminal, a line every 30 s in a log)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads for torch (1 is fastest on a busy machine)"
    )


def run(args: argparse.Namespace) -> int:
    from vitscope.pretrain import FinetuneConfig, finetune

    check_training_device(args.device)
    config = FinetuneConfig(
        model=args.model,
        model_kwargs=args.model_kwargs,
        data=args.data,
        test_data=args.test_data,
        num_images=args.num_images,
        num_test_images=args.num_test_images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        blr=args.blr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        warmup_epochs=1.0 if args.warmup_epochs is None else args.warmup_epochs,
        warmup_steps=args.warmup_steps,
        min_lr=args.min_lr,
        clip_grad=args.clip_grad or None,
        drop_path=args.drop_path,
        crop_min_scale=args.crop_min_scale,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        out=args.out,
        save_every=args.save_every,
        resume=args.resume,
        progress=not args.no_progress,
        track_every=args.track_every,
        track_images=args.track_images,
    )
    set_threads(args.threads)
    try:
        result = finetune(config)
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the checkpoint kept named
        print(f"vitscope finetune: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    if result.env.is_main:
        scores = ", ".join(f"{100 * acc:.2f}%" for acc in result.top1)
        print(f"finetune: top-1 per epoch [{scores}]; model at {result.out / 'model.safetensors'}")
    return 0
