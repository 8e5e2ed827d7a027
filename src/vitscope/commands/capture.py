"""`vitscope capture`: one forward pass per batch over real images, a per-layer summary printed."""

from __future__ import annotations

import argparse
import math

import torch

from vitscope.capture import LayerOutput, make_capture
from vitscope.commands.common import non_negative_int, positive_int
from vitscope.data import SkipCounter, build_transform, make_loader, open_dataset
from vitscope.models import load_model
from vitscope.progress import progress_bar


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="random:vit_tiny_patch16_224", metavar="SPEC", help="model spec, as in every command"
    )
    parser.add_argument("--data", default="fashion-mnist", help="data spec (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="which split of --data")
    parser.add_argument("--num-images", type=positive_int, default=64, help="images to pass (a stratified subset)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the image choice")


class LayerSummary:
    """Running per-depth means of token norm and attention row entropy (a quick health check)."""

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, float]] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}

    def __call__(self, layer: LayerOutput) -> None:
        row = self.sums.setdefault(layer.depth, {"n": 0.0, "norm": 0.0, "entropy": 0.0})  # entropy NaN: no attention
        batch = layer.tokens.shape[0]
        row["n"] += batch
        row["norm"] += layer.spatial_tokens.float().norm(dim=-1).mean(dim=1).sum().item()
        self.shapes[layer.depth] = tuple(layer.tokens.shape[1:])
        attn = layer.spatial_attn
        if attn is not None:
            p = attn.float()
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(1, 2))  # [B] (or [B·W] per window)
            row["entropy"] += layer.per_image(entropy).sum().item()
        else:
            row["entropy"] = math.nan

    def table(self) -> str:
        lines = [f"{'depth':>5}  {'tokens x dim':>14}  {'token norm':>10}  {'attn entropy':>12}"]
        for depth in sorted(self.sums):
            row = self.sums[depth]
            n = row["n"]
            shape = "x".join(str(s) for s in self.shapes[depth])
            entropy = row["entropy"] / n
            shown = "—" if math.isnan(entropy) else f"{entropy:.3f}"  # depth 0 (patch embedding) has no attention
            lines.append(f"{depth:>5}  {shape:>14}  {row['norm'] / n:>10.3f}  {shown:>12}")
        return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    capture = make_capture(model)
    dataset = open_dataset(args.data, args.split, build_transform(model))
    loader = make_loader(dataset, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed)
    summary, skips = LayerSummary(), SkipCounter()
    seen = 0
    torch.manual_seed(args.seed)
    for batch in progress_bar(loader, desc="capture", unit="batch"):
        skips.update(batch)
        if len(batch.images):
            capture.run(batch.images, summary)
            seen += len(batch.images)
    facts = capture.facts
    print(
        f"model {args.model}: {facts.kind}, {facts.num_layers} layers, {facts.heads_text()} heads, "
        f"{facts.num_prefix_tokens} prefix tokens, patch {facts.patch_size[0]}x{facts.patch_size[1]}"
    )
    print(f"data {args.data} ({args.split}): {seen} images; {skips.report()}")
    print(summary.table())
    return 0
