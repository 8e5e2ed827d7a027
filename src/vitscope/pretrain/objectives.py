"""Pretraining objectives on one timm ViT encoder: MoCo v3, SimMIM, MAE and the CL + MIM hybrid.

Each objective is an ``nn.Module`` with
- ``encoder``: the timm ``VisionTransformer`` being trained (``num_classes=0``; its state dict is
  what gets exported, under timm's key names);
- ``prepare(images, generator, momentum) -> dict``: augmented views and random masks for one
  batch, every random draw from ``generator`` (so a batch is a function of its seed);
- ``forward(inputs) -> dict``: ``loss`` plus named parts, deterministic given ``inputs``.
The losses themselves are small functions (``moco_contrastive_loss``, ``simmim_loss``, ``mae_loss``)
so tests can check them against hand computations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import cast

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from vitscope.pretrain import augment
from vitscope.pretrain.finite import check_number

__all__ = [
    "ObjectiveConfig",
    "create_encoder",
    "sincos_pos_embed_2d",
    "patchify",
    "unpatchify",
    "concat_all_gather",
    "moco_contrastive_loss",
    "simmim_loss",
    "mae_loss",
    "mae_pixel_targets",
    "random_masking",
    "simmim_mask",
    "simmim_pixel_head",
    "moco_momentum",
    "MoCoV3",
    "SimMIM",
    "MAE",
    "Hybrid",
    "build_objective",
    "METHODS",
]

METHODS = ("moco", "simmim", "mae", "hybrid")


@dataclass
class ObjectiveConfig:
    """Hyper-parameters of the objectives (defaults: the official recipes, decoders scaled down)."""

    method: str = "moco"
    mim: str = "simmim"  # the MIM half of the hybrid
    cl_weight: float = 0.2  # λ of the hybrid: (1 − λ)·L_MIM + λ·L_CL
    # MoCo v3
    moco_dim: int = 256
    moco_mlp_dim: int = 1024  # official 4096; 1024 keeps tiny encoders' heads in proportion
    moco_t: float = 0.2
    moco_m: float = 0.99
    freeze_patch_embed: bool = False
    # SimMIM / MAE
    mask_ratio: float | None = None  # None: 0.6 (SimMIM) / 0.75 (MAE)
    mask_patch_size: int | None = None  # SimMIM mask granularity in pixels (None: the patch size)
    norm_pix_loss: bool = True  # MAE's per-patch normalised pixel targets
    decoder_dim: int = 128  # MAE light decoder (official ViT-B: 512 / 8 / 16)
    decoder_depth: int = 2
    decoder_heads: int = 4
    simmim_head_depth: int = 0  # 0: SimMIM's linear head; N: N blocks of decoder_dim/heads before it
    crop_min_scale: float | None = None  # None: the recipe's own (see augment.default_crop_scale)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ObjectiveConfig.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.mim not in ("simmim", "mae"):
            raise ValueError(f"ObjectiveConfig.mim must be simmim or mae, got {self.mim!r}")
        check_number("ObjectiveConfig", "cl_weight", self.cl_weight, 0.0, 1.0)
        check_number("ObjectiveConfig", "moco_t", self.moco_t, 0.0, low_open=True)
        check_number("ObjectiveConfig", "moco_m", self.moco_m, 0.0, 1.0)
        check_number("ObjectiveConfig", "mask_ratio", self.mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_number("ObjectiveConfig", "crop_min_scale", self.crop_min_scale, 0.0, 1.0, low_open=True)
        for name in ("moco_dim", "moco_mlp_dim", "mask_patch_size", "decoder_dim", "decoder_depth", "decoder_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ObjectiveConfig.{name} must be positive, got {value}")
        if self.simmim_head_depth < 0:
            raise ValueError(f"ObjectiveConfig.simmim_head_depth must be 0 or more, got {self.simmim_head_depth}")


# -------------------------------------------------------------------------------------- the encoder
def sincos_pos_embed_2d(grid: tuple[int, int], dim: int, num_prefix: int = 1, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding [1, num_prefix + h·w, dim] (MoCo v3's layout).

    Per cell (row r, col c): [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)] with ω_k = T^(−k/(dim/4));
    prefix tokens get zeros.
    """
    if dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos position embedding, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float64) / pos_dim)
    out_c = cols.flatten()[:, None] * omega[None]
    out_r = rows.flatten()[:, None] * omega[None]
    emb = torch.cat([out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()], dim=1)
    emb = torch.cat([torch.zeros(num_prefix, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()[None]


def create_encoder(
    arch: str, model_kwargs: dict | None = None, *, sincos_pos: bool = False, freeze_patch_embed: bool = False
) -> VisionTransformer:
    """A timm ViT without classifier head (``num_classes=0``), optionally with MoCo v3's tricks.

    ``sincos_pos`` replaces the learned position embedding by a fixed 2-D sin-cos one;
    ``freeze_patch_embed`` stops gradients into the patch projection.
    """
    name = arch.split(":", 1)[1] if arch.startswith("timm:") else arch
    kwargs = dict(model_kwargs or {})
    kwargs["num_classes"] = 0
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as err:  # unknown model name / bad kwargs
        raise ValueError(f"model {arch!r} with kwargs {model_kwargs}: {err}") from err
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model {arch!r}: pretraining needs a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None or model.reg_token is not None or model.dynamic_img_size:
        raise ValueError(f"model {arch!r}: pretraining needs a class token, no register tokens and a fixed image size")
    for block in model.blocks:  # train with fused attention (SDPA), whatever an analysis switched off
        if hasattr(block.attn, "fused_attn"):
            block.attn.fused_attn = True
    if sincos_pos:
        if model.pos_embed is None:
            raise ValueError(f"model {arch!r} has no absolute position embedding to make sin-cos")
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed.data.copy_(sincos_pos_embed_2d(model.patch_embed.grid_size, model.embed_dim, prefix))
        model.pos_embed.requires_grad_(False)
    if freeze_patch_embed:
        model.patch_embed.proj.weight.requires_grad_(False)
        model.patch_embed.proj.bias.requires_grad_(False)
    return model


def encoder_geometry(encoder: VisionTransformer) -> tuple[int, int, tuple[int, int]]:
    """(image size, patch size, grid) of a timm ViT built for square images."""
    img = encoder.patch_embed.img_size
    patch = encoder.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        raise ValueError(f"pretraining needs square images and patches, got img {img} patch {patch}")
    return img[0], patch[0], tuple(encoder.patch_embed.grid_size)


def encoder_norm_stats(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] → [B, N, p·p·C], patches in row-major order, pixels (row, col, channel) inside."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid[0] * patch, grid[1] * patch)


def _encode(encoder: VisionTransformer, tokens: Tensor) -> Tensor:
    """Blocks and final norm of a timm ViT over already-embedded tokens [B, T, C]."""
    return encoder.norm(encoder.blocks(encoder.norm_pre(encoder.patch_drop(tokens))))


# ------------------------------------------------------------------------------------------- MoCo v3
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every process along dim 0; the local slice keeps its autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def moco_contrastive_loss(q: Tensor, k: Tensor, tau: float, rank: int = 0) -> tuple[Tensor, Tensor]:
    """InfoNCE of queries [n, d] against all keys [m, d] (m = n·world), scaled by 2τ, and the logits.

    Positives are the keys of the same images: row i's label is i + n·rank.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.t() / tau
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * tau), logits


def moco_momentum(progress: float, base: float = 0.99) -> float:
    """m rising from ``base`` to 1 by a half cosine over training progress ∈ [0, 1]."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def _mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: (Linear without bias, BN, ReLU) × (n − 1), Linear, BN without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """MoCo v3: base encoder + 3-layer projector + 2-layer predictor, momentum encoder + projector.

    loss = ctr(q1, k2) + ctr(q2, k1), each InfoNCE over the global batch of keys, scaled by 2τ.
    """

    method = "moco"

    def __init__(self, encoder: VisionTransformer, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.projector = _mlp(3, encoder.embed_dim, cfg.moco_mlp_dim, cfg.moco_dim)
        self.predictor = _mlp(2, cfg.moco_dim, cfg.moco_mlp_dim, cfg.moco_dim)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)
        self.image_size, _, _ = encoder_geometry(encoder)
        self.mean, self.std = encoder_norm_stats(encoder)
        self.view_specs = augment.moco_view_specs(self.image_size, cfg.crop_min_scale)
        self.last_logits_shape: tuple[int, int] | None = None

    def prepare(self, images: Tensor, generator: torch.Generator, momentum: float = 0.99) -> dict:
        x = augment.to_float_rgb(images)
        view1 = augment.make_view(x, self.image_size, self.view_specs[0], generator, self.mean, self.std)
        view2 = augment.make_view(x, self.image_size, self.view_specs[1], generator, self.mean, self.std)
        return {"view1": view1, "view2": view2, "momentum": torch.tensor(float(momentum), dtype=torch.float64)}

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        pairs = list(zip(self.encoder.parameters(), self.momentum_encoder.parameters()))
        pairs += list(zip(self.projector.parameters(), self.momentum_projector.parameters()))
        for online, target in pairs:
            target.mul_(m).add_(online.detach(), alpha=1.0 - m)

    def queries(self, images: Tensor) -> Tensor:
        return self.predictor(self.projector(self.encoder(images)))

    @torch.no_grad()
    def keys(self, images: Tensor) -> Tensor:
        return self.momentum_projector(self.momentum_encoder(images))

    def forward(self, inputs: dict) -> dict:
        q1, q2 = self.queries(inputs["view1"]), self.queries(inputs["view2"])
        self.update_momentum(float(inputs["momentum"]))
        k1, k2 = self.keys(inputs["view1"]), self.keys(inputs["view2"])
        rank = _rank()
        loss_a, logits = moco_contrastive_loss(q1, concat_all_gather(k2), self.cfg.moco_t, rank)
        loss_b, _ = moco_contrastive_loss(q2, concat_all_gather(k1), self.cfg.moco_t, rank)
        self.last_logits_shape = (logits.shape[0], logits.shape[1])
        loss = loss_a + loss_b
        return {"loss": loss, "loss_cl": loss.detach()}


# -------------------------------------------------------------------------------------------- SimMIM
def simmim_mask(batch: int, grid: tuple[int, int], ratio: float, scale: int, generator: torch.Generator) -> Tensor:
    """SimMIM's mask generator: ⌈ratio·cells⌉ random cells of a coarse grid (cell = ``scale`` patches
    a side) masked per image, upsampled to the patch grid. Returns float {0, 1} [B, h·w], 1 = masked."""
    h, w = grid
    if h % scale or w % scale:
        raise ValueError(f"mask patch size must divide the grid: grid {grid}, {scale} patches per mask cell")
    cells = (h // scale) * (w // scale)
    count = math.ceil(cells * ratio)
    order = torch.rand(batch, cells, generator=generator).argsort(dim=1)
    coarse = torch.zeros(batch, cells)
    coarse.scatter_(1, order[:, :count], 1.0)
    coarse = coarse.view(batch, h // scale, w // scale)
    return coarse.repeat_interleave(scale, 1).repeat_interleave(scale, 2).reshape(batch, h * w)


def simmim_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the pixels of masked patches only. pred/target [B, N, D], mask [B, N]."""
    per_patch = (pred.float() - target.float()).abs().mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1e-5)


def simmim_pixel_head(embed_dim: int, pixels: int, cfg: ObjectiveConfig) -> nn.Module:
    """SimMIM's prediction head: one linear layer (the official recipe, ``simmim_head_depth`` 0), or
    the heavier heads of SimMIM's head ablation: a linear embedding to ``decoder_dim``,
    ``simmim_head_depth`` timm blocks, a LayerNorm and the linear pixel prediction. Tokens [B, N, C]
    -> pixels [B, N, pixels]."""
    if cfg.simmim_head_depth == 0:
        return nn.Linear(embed_dim, pixels)
    dim = cfg.decoder_dim
    blocks = [Block(dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.simmim_head_depth)]
    head = nn.Sequential(nn.Linear(embed_dim, dim), *blocks, nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, pixels))
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return head


class SimMIM(nn.Module):
    """SimMIM: masked patches replaced by a learned mask token, a head (linear by default) predicts
    their pixels."""

    method = "simmim"

    def __init__(self, encoder: VisionTransformer, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.image_size, self.patch, self.grid = encoder_geometry(encoder)
        self.mean, self.std = encoder_norm_stats(encoder)
        self.mask_ratio = cfg.mask_ratio if cfg.mask_ratio is not None else 0.6
        mask_patch = cfg.mask_patch_size or self.patch
        if mask_patch % self.patch:
            raise ValueError(f"mask_patch_size {mask_patch} must be a multiple of the patch size {self.patch}")
        self.mask_scale = mask_patch // self.patch
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pixel_head = simmim_pixel_head(encoder.embed_dim, self.patch * self.patch * 3, cfg)
        self.view_spec = augment.mim_view_spec("simmim", self.image_size, cfg.crop_min_scale)

    def make_mask(self, batch: int, generator: torch.Generator) -> Tensor:
        return simmim_mask(batch, self.grid, self.mask_ratio, self.mask_scale, generator)

    def prepare(self, images: Tensor, generator: torch.Generator, momentum: float = 0.99) -> dict:
        view = augment.make_view(
            augment.to_float_rgb(images), self.image_size, self.view_spec, generator, self.mean, self.std
        )
        return {"mim_view": view, "mask": self.make_mask(view.shape[0], generator).to(view.device)}

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """Pixel predictions [B, N, p·p·3] for every patch of images [B, 3, H, W] with mask [B, N] hidden."""
        x = self.encoder.patch_embed(images)  # [B, N, C]
        w = mask.to(x.dtype).unsqueeze(-1)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = _encode(self.encoder, self.encoder._pos_embed(x))  # [B, 1 + N, C]
        return self.pixel_head(x[:, self.encoder.num_prefix_tokens :])

    def forward(self, inputs: dict) -> dict:
        images, mask = inputs["mim_view"], inputs["mask"]
        pred = self.reconstruct(images, mask)
        loss = simmim_loss(pred, patchify(images, self.patch), mask)
        return {"loss": loss, "loss_mim": loss.detach()}


# ----------------------------------------------------------------------------------------------- MAE
def random_masking(x: Tensor, noise: Tensor, ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample shuffle: keep the ⌊N(1 − ratio)⌋ tokens of lowest noise.

    x [B, N, C], noise [B, N] → (kept tokens [B, K, C], mask [B, N] with 1 = removed, ids_restore [B, N]).
    """
    b, n, c = x.shape
    keep = int(n * (1 - ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, c))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def mae_pixel_targets(patches: Tensor, norm_pix: bool = True) -> Tensor:
    """Per-patch normalised pixels (x − mean) / sqrt(var + 1e-6), var unbiased as in MAE."""
    if not norm_pix:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over masked patches only. pred/target [B, N, D], mask [B, N]."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1e-5)


class MAE(nn.Module):
    """MAE: the encoder sees only visible patches; a light decoder with mask tokens predicts pixels."""

    method = "mae"
    decoder_pos_embed: Tensor  # a buffer

    def __init__(self, encoder: VisionTransformer, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.image_size, self.patch, self.grid = encoder_geometry(encoder)
        self.mean, self.std = encoder_norm_stats(encoder)
        self.mask_ratio = cfg.mask_ratio if cfg.mask_ratio is not None else 0.75
        n = self.grid[0] * self.grid[1]
        if int(n * (1 - self.mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of {n}")
        dim = cfg.decoder_dim
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(self.grid, dim, 1), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.view_spec = augment.mim_view_spec("mae", self.image_size, cfg.crop_min_scale)

    def prepare(self, images: Tensor, generator: torch.Generator, momentum: float = 0.99) -> dict:
        view = augment.make_view(
            augment.to_float_rgb(images), self.image_size, self.view_spec, generator, self.mean, self.std
        )
        noise = torch.rand(view.shape[0], self.grid[0] * self.grid[1], generator=generator)
        return {"mim_view": view, "noise": noise.to(view.device)}

    def encode_visible(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder over the visible patches only: (latent [B, 1 + K, C], mask [B, N], ids_restore [B, N])."""
        enc = self.encoder
        x = enc.patch_embed(images)  # [B, N, C]
        prefix_pos = None
        if enc.pos_embed is not None:
            if enc.no_embed_class:
                x = x + enc.pos_embed
            else:
                x = x + enc.pos_embed[:, enc.num_prefix_tokens :]
                prefix_pos = enc.pos_embed[:, : enc.num_prefix_tokens]
        x, mask, ids_restore = random_masking(x, noise, self.mask_ratio)
        cls_token = cast(Tensor, enc.cls_token)  # not None: create_encoder requires a class token
        cls = cls_token if prefix_pos is None else cls_token + prefix_pos
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        return _encode(enc, enc.pos_drop(x)), mask, ids_restore

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Decoder: unshuffle with mask tokens, add positions, blocks → pixel predictions [B, N, p·p·3]."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        filler = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], filler], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def forward(self, inputs: dict) -> dict:
        images = inputs["mim_view"]
        latent, mask, ids_restore = self.encode_visible(images, inputs["noise"])
        pred = self.decode(latent, ids_restore)
        target = mae_pixel_targets(patchify(images, self.patch).float(), self.cfg.norm_pix_loss)
        loss = mae_loss(pred, target, mask)
        return {"loss": loss, "loss_mim": loss.detach()}


# -------------------------------------------------------------------------------------------- Hybrid
class Hybrid(nn.Module):
    """One shared encoder, L = (1 − λ)·L_MIM + λ·L_CL in one step (MIM on its own lightly augmented
    view, CL on MoCo v3's two views)."""

    method = "hybrid"

    def __init__(self, encoder: VisionTransformer, cfg: ObjectiveConfig) -> None:
        super().__init__()
        if not 0.0 <= cfg.cl_weight <= 1.0:
            raise ValueError(f"cl_weight must be in [0, 1], got {cfg.cl_weight}")
        self.cfg = cfg
        self.encoder = encoder
        self.cl = MoCoV3(encoder, cfg)
        self.mim = (SimMIM if cfg.mim == "simmim" else MAE)(encoder, cfg)

    def prepare(self, images: Tensor, generator: torch.Generator, momentum: float = 0.99) -> dict:
        return {**self.mim.prepare(images, generator), **self.cl.prepare(images, generator, momentum)}

    def forward(self, inputs: dict) -> dict:
        lam = self.cfg.cl_weight
        mim = self.mim(inputs)["loss"]
        cl = self.cl(inputs)["loss"]
        loss = (1.0 - lam) * mim + lam * cl
        return {"loss": loss, "loss_mim": mim.detach(), "loss_cl": cl.detach()}

    @property
    def last_logits_shape(self) -> tuple[int, int] | None:
        return self.cl.last_logits_shape


Objective = MoCoV3 | SimMIM | MAE | Hybrid


def build_objective(arch: str, model_kwargs: dict | None, cfg: ObjectiveConfig) -> Objective:
    """The objective module for ``cfg.method`` around a fresh encoder (MoCo/MAE/hybrid: sin-cos positions)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    if cfg.mim not in ("simmim", "mae"):
        raise ValueError(f"mim must be simmim or mae, not {cfg.mim!r}")
    uses_cl = cfg.method in ("moco", "hybrid")
    sincos = cfg.method != "simmim"
    encoder = create_encoder(
        arch, model_kwargs, sincos_pos=sincos, freeze_patch_embed=cfg.freeze_patch_embed and uses_cl
    )
    classes: dict[str, type[Objective]] = {"moco": MoCoV3, "simmim": SimMIM, "mae": MAE, "hybrid": Hybrid}
    cls = classes[cfg.method]
    return cls(encoder, cfg)
