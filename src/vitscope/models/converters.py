"""One converter per official checkpoint source, and the architecture read off the tensors' shapes.

A converter takes what :func:`~vitscope.models.safe_load.read_checkpoint` returned and gives a
:class:`Converted`: the encoder's weights under timm's names, the model family they fit (timm
``VisionTransformer`` or timm ``Beit``), and every key it left out on purpose. The layouts:

==========  ====================================================================================
moco-v3     ``{epoch, arch, state_dict, optimizer[, scaler]}``; ``module.base_encoder.*`` (timm
            names, ``head.*`` = 3-layer projector), ``module.momentum_encoder.*``, ``module.predictor.*``
mae         ``{model}`` encoder only; ``*_full.pth`` adds ``mask_token`` and ``decoder_*``; training
            checkpoints ``{model, optimizer, epoch, scaler, args}``
simmim      ``{model, optimizer, lr_scheduler, max_accuracy, epoch, config[, amp]}``; ``encoder.*``
            (BEiT-shaped) and ``decoder.0.*``
beit        ``{model}`` or ``{module}`` (training: ``+ optimizer, epoch, scaler, args``); ``lm_head``,
            ``mask_token``, ``relative_position_index`` buffers
dino        ``*_pretrain.pth``: bare timm-named dict; ``*_full_checkpoint.pth``: ``{student, teacher,
            optimizer, epoch, args, dino_loss[, fp16_scaler]}`` with ``module.backbone.*`` (student)
            and ``backbone.*`` (teacher)
==========  ====================================================================================

The head count is not in the weights of a plain ViT (``qkv`` is ``[3·C, C]`` whatever the split), and
loading into the wrong count raises no error but gives wrong attention. It is taken, in order, from
the user's ``num_heads=``, a relative-position bias table (``[L, heads]``, BEiT/SimMIM), the checkpoint's
own config (SimMIM), or the source's official configs keyed by embed dim (MoCo v3's ViT-S has 12
heads where timm's has 6); a ViT of any other width needs ``num_heads=``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vitscope.models.safe_load import CheckpointError

__all__ = [
    "Converted",
    "SourceFacts",
    "SOURCES",
    "ArchGuess",
    "convert",
    "infer_arch",
    "infer_vit_arch",
    "infer_beit_arch",
    "resolve_num_heads",
    "checkpoint_img_size",
    "pool_kwargs",
    "rel_table_facts",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SourceFacts:
    """What each official release fixes that its tensors do not show."""

    name: str
    heads_by_dim: Mapping[int, int]  # official configs: embed dim -> heads
    mean: tuple[float, float, float]  # the normalisation the model was trained with
    std: tuple[float, float, float]


SOURCES: dict[str, SourceFacts] = {
    "moco-v3": SourceFacts("moco-v3", {384: 12, 768: 12, 1024: 16, 1280: 16}, IMAGENET_MEAN, IMAGENET_STD),
    "dino": SourceFacts("dino", {192: 3, 384: 6, 768: 12}, IMAGENET_MEAN, IMAGENET_STD),
    "mae": SourceFacts("mae", {768: 12, 1024: 16, 1280: 16}, IMAGENET_MEAN, IMAGENET_STD),
    "simmim": SourceFacts("simmim", {768: 12, 1024: 16}, IMAGENET_MEAN, IMAGENET_STD),
    "beit": SourceFacts("beit", {768: 12, 1024: 16}, INCEPTION_MEAN, INCEPTION_STD),
}


@dataclass
class Converted:
    """An encoder's weights in timm names, ready for a timm model of ``family`` ("vit" or "beit")."""

    state_dict: dict[str, Tensor]
    family: str
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_heads_hint: int | None = None  # from the checkpoint's own config, when it has one


# ---------------------------------------------------------------- shared steps
def _split_entries(checkpoint: Any, weight_keys: tuple[str, ...], source: str) -> tuple[Mapping[str, Any], list[str]]:
    """The weights entry of a checkpoint (first of ``weight_keys`` present, else the checkpoint itself
    when it is a bare state dict) and the names of the other top-level entries (ignored metadata)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} checkpoint: expected a dict, got {type(checkpoint).__name__}")
    for key in weight_keys:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key], [str(name) for name in checkpoint if name != key]
    if any(isinstance(value, Tensor) for value in checkpoint.values()):
        return checkpoint, []
    raise CheckpointError(
        f"{source} checkpoint: none of the entries {list(weight_keys)} holds weights; "
        f"top-level entries: {sorted(map(str, checkpoint))}"
    )


def _tensors(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {str(key): value for key, value in state.items() if isinstance(value, Tensor)}


def _take_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> tuple[str | None, dict[str, Tensor]]:
    """The first prefix that some key starts with, and those keys with it removed."""
    for prefix in prefixes:
        taken = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if taken:
            return prefix, taken
    return None, {}


def _drop(state: dict[str, Tensor], is_dropped: Callable[[str], bool], label: str = "") -> list[str]:
    """Remove keys matching ``is_dropped`` from ``state`` in place; return them (with ``label`` prefix)."""
    dropped = [key for key in state if is_dropped(key)]
    for key in dropped:
        del state[key]
    return [label + key for key in dropped]


def _ignored_note(entries: list[str]) -> list[str]:
    return [f"ignored checkpoint entries (not weights): {', '.join(entries)}"] if entries else []


def _is_rel_pos_index(key: str) -> bool:
    return key.endswith("relative_position_index")


# ---------------------------------------------------------------- converters
def _convert_moco_v3(checkpoint: Any, part: str = "base") -> Converted:
    """MoCo v3: take ``base_encoder`` (or ``momentum_encoder`` with ``part="momentum"``), drop the rest."""
    if part not in ("base", "momentum"):
        raise ValueError(f"moco-v3: part={part!r}; expected 'base' (base encoder) or 'momentum'")
    state, ignored = _split_entries(checkpoint, ("state_dict", "model"), "moco-v3")
    state = _tensors(state)
    encoder = f"{part}_encoder."
    prefix, encoder_state = _take_prefix(state, (f"module.{encoder}", encoder))
    if prefix is None:
        if any("_encoder." in key for key in state):
            raise CheckpointError(
                f"moco-v3 checkpoint has no {encoder}* weights; prefixes found: "
                f"{sorted({key.split('.')[0] + '.' + key.split('.')[1] for key in state if '.' in key})}"
            )
        prefix, encoder_state = "", dict(state)  # already converted to plain timm names
    dropped = [key for key in state if not key.startswith(prefix)] if prefix else []
    dropped += _drop(encoder_state, lambda key: key.startswith("head."), prefix)
    if "patch_embed.proj.weight" not in encoder_state and any(k.startswith("patch_embed.proj.") for k in encoder_state):
        arch = checkpoint.get("arch") if isinstance(checkpoint, Mapping) else None
        raise CheckpointError(
            f"moco-v3 checkpoint ({arch or 'conv-stem ViT'}): the convolutional-stem ViTs "
            "(vit_conv_*) have no timm equivalent; only vit_small/base/large/huge load"
        )
    notes = [
        f"took the {part} encoder ({prefix or 'no prefix'}*); projector head.* and "
        f"{'predictor/momentum encoder' if part == 'base' else 'predictor/base encoder'} dropped"
    ]
    return Converted(encoder_state, "vit", dropped, notes + _ignored_note(ignored))


def _convert_mae(checkpoint: Any) -> Converted:
    """MAE: the encoder under timm names; ``mask_token`` and ``decoder_*`` (``*_full.pth``) dropped."""
    state, ignored = _split_entries(checkpoint, ("model",), "mae")
    state = _tensors(state)
    dropped = _drop(state, lambda key: key == "mask_token" or key.startswith("decoder_"))
    notes = _ignored_note(ignored)
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    model_name = getattr(args, "model", None)
    if model_name:
        notes.append(f"training args.model = {model_name}")
    return Converted(state, "vit", dropped, notes)


def _convert_dino(checkpoint: Any, part: str = "teacher") -> Converted:
    """DINO: a bare backbone dict, or the ``teacher`` (default) / ``student`` backbone of a full checkpoint."""
    if part not in ("teacher", "student"):
        raise ValueError(f"dino: part={part!r}; expected 'teacher' or 'student'")
    if isinstance(checkpoint, Mapping) and ("teacher" in checkpoint or "student" in checkpoint):
        if not isinstance(checkpoint.get(part), Mapping):
            raise CheckpointError(
                f"dino full checkpoint has no '{part}' entry; entries: {sorted(map(str, checkpoint))}"
            )
        other = "student" if part == "teacher" else "teacher"
        state = _tensors(checkpoint[part])
        dropped = [f"{other}/{key}" for key in _tensors(checkpoint.get(other) or {})]
        ignored = [str(name) for name in checkpoint if name not in ("teacher", "student")]
        label = f"{part}/"
        notes = [f"took the {part} backbone of a full DINO checkpoint; the {other} and the DINO heads dropped"]
    else:
        entries, ignored = _split_entries(checkpoint, ("model", "state_dict"), "dino")
        state, dropped, label, notes = _tensors(entries), [], "", []
    prefix, backbone = _take_prefix(state, ("module.backbone.", "backbone.", "module."))
    if prefix is None:
        prefix, backbone = "", dict(state)
    dropped += [label + key for key in state if not key.startswith(prefix)]
    dropped += _drop(backbone, lambda key: key.startswith("head."), label + prefix)
    return Converted(backbone, "vit", dropped, notes + _ignored_note(ignored))


def _convert_simmim(checkpoint: Any) -> Converted:
    """SimMIM ViT: ``encoder.*`` onto timm Beit; ``decoder.*``, ``mask_token``, index buffers dropped."""
    state, ignored = _split_entries(checkpoint, ("model",), "simmim")
    state = _tensors(state)
    if any(key.startswith(("encoder.layers.", "module.encoder.layers.")) for key in state):
        raise CheckpointError(
            "simmim checkpoint holds a Swin Transformer encoder; only the ViT encoder loads (onto timm Beit)"
        )
    prefix, encoder = _take_prefix(state, ("module.encoder.", "encoder."))
    if prefix is None:
        prefix, encoder = "", dict(state)
    dropped = [key for key in state if not key.startswith(prefix)] if prefix else []
    dropped += _drop(encoder, lambda key: key == "mask_token" or _is_rel_pos_index(key), prefix)
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    hint = _config_value(config, ("MODEL", "VIT", "NUM_HEADS"))
    model_type = _config_value(config, ("MODEL", "TYPE"))
    if model_type not in (None, "vit"):
        raise CheckpointError(f"simmim checkpoint config MODEL.TYPE = {model_type!r}; only 'vit' loads")
    notes = _ignored_note(ignored)
    if hint is not None:
        notes.append(f"config MODEL.VIT.NUM_HEADS = {hint}")
    return Converted(encoder, "beit", dropped, notes, num_heads_hint=int(hint) if hint is not None else None)


def _convert_beit(checkpoint: Any) -> Converted:
    """BEiT (unilm): ``model``/``module`` unwrapped; ``lm_head``, ``mask_token``, index buffers dropped."""
    state, ignored = _split_entries(checkpoint, ("model", "module"), "beit")
    if isinstance(state.get("module"), Mapping):  # beit v2 kept the DDP wrapper inside 'model'
        state = state["module"]
    state = _tensors(state)
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    dropped = _drop(state, lambda key: key == "mask_token" or key.startswith("lm_head.") or _is_rel_pos_index(key))
    return Converted(state, "beit", dropped, _ignored_note(ignored))


_CONVERTERS: dict[str, Callable[..., Converted]] = {
    "moco-v3": _convert_moco_v3,
    "mae": _convert_mae,
    "dino": _convert_dino,
    "simmim": _convert_simmim,
    "beit": _convert_beit,
}


def convert(source: str, checkpoint: Any, part: str | None = None) -> Converted:
    """Run the converter of ``source`` (``part`` picks the encoder for moco-v3 and dino)."""
    converter = _CONVERTERS[source]
    if part is None:
        return converter(checkpoint)
    if source not in ("moco-v3", "dino"):
        raise ValueError(
            f"{source}: part= is only meaningful for moco-v3 ('base'/'momentum') and dino ('teacher'/'student')"
        )
    return converter(checkpoint, part=part)


def _config_value(config: Any, path: tuple[str, ...]) -> Any:
    node = config
    for key in path:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        else:
            return None
    return node


# ---------------------------------------------------------------- architecture from shapes
@dataclass
class ArchGuess:
    """A timm model name and the keyword arguments that make it match a state dict."""

    arch: str
    kwargs: dict[str, Any]


_VIT_NAMES = {
    (16, 192, 12): "vit_tiny_patch16_224",
    (16, 384, 12): "vit_small_patch16_224",
    (8, 384, 12): "vit_small_patch8_224",
    (16, 768, 12): "vit_base_patch16_224",
    (8, 768, 12): "vit_base_patch8_224",
    (16, 1024, 24): "vit_large_patch16_224",
    (14, 1280, 32): "vit_huge_patch14_224",
}
_BEIT_NAMES = {(16, 768, 12): "beit_base_patch16_224", (16, 1024, 24): "beit_large_patch16_224"}


def resolve_num_heads(
    source: str,
    embed_dim: int,
    *,
    override: int | None = None,
    hint: int | None = None,
    from_shapes: int | None = None,
    required: bool = True,
) -> int | None:
    """Heads: ``override`` > a shape that shows them > the checkpoint's config > the official table."""
    if override is not None:
        if from_shapes is not None and int(override) != from_shapes:
            raise CheckpointError(
                f"{source}: num_heads={override} but the checkpoint's relative position "
                f"bias table has {from_shapes} heads"
            )
        return int(override)
    for value in (from_shapes, hint):
        if value is not None:
            return int(value)
    table = SOURCES[source].heads_by_dim if source in SOURCES else {}
    if embed_dim in table:
        return table[embed_dim]
    if not required:
        return None
    known = ", ".join(f"{dim}->{heads}" for dim, heads in table.items()) or "none"
    raise CheckpointError(
        f"{source}: embed dim {embed_dim} matches no official {source} ViT (embed dim -> heads: "
        f"{known}); the head count cannot be read from the weights, so pass num_heads="
    )


def _patch_facts(state: Mapping[str, Tensor], source: str) -> tuple[int, tuple[int, int], int]:
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointError(
            f"{source}: no patch_embed.proj.weight [C, 3, p, p] among the weights; not a ViT "
            f"checkpoint? first keys: {list(state)[:8]}"
        )
    return int(weight.shape[0]), (int(weight.shape[2]), int(weight.shape[3])), int(weight.shape[1])


def _depth(state: Mapping[str, Tensor]) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))}
    if not indices:
        raise CheckpointError("no transformer blocks (blocks.N.*) among the weights")
    if indices != set(range(max(indices) + 1)):
        raise CheckpointError(f"blocks are not numbered 0..N-1: found {sorted(indices)}")
    return max(indices) + 1


def _square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise CheckpointError(f"{what}: {count} positions do not form a square grid; pass img_size=")
    return side


def pool_kwargs(state: Mapping[str, Tensor], class_token: bool) -> dict[str, Any]:
    """Pooling and classifier as the checkpoint has them: SSL encoders -> CLS token, no head."""
    head = state.get("head.weight")
    kwargs: dict[str, Any] = {"num_classes": int(head.shape[0]) if head is not None and head.ndim == 2 else 0}
    uses_fc_norm = "fc_norm.weight" in state
    kwargs["global_pool"] = "avg" if (uses_fc_norm or not class_token) else "token"
    return kwargs


def infer_vit_arch(
    state: Mapping[str, Tensor], source: str, *, num_heads: int | None = None, num_heads_hint: int | None = None
) -> ArchGuess:
    """A timm ``VisionTransformer`` matching ``state``: width, depth, patch, grid, MLP ratio, biases."""
    embed_dim, patch, in_chans = _patch_facts(state, source)
    depth = _depth(state)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    class_token = "cls_token" in state
    kwargs: dict[str, Any] = {
        "embed_dim": embed_dim,
        "depth": depth,
        "patch_size": patch[0] if patch[0] == patch[1] else patch,
        "in_chans": in_chans,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "class_token": class_token,
        "num_heads": resolve_num_heads(source, embed_dim, override=num_heads, hint=num_heads_hint),
    }
    if fc1 is not None:
        kwargs["mlp_ratio"] = fc1.shape[0] / embed_dim
    if "reg_token" in state:
        kwargs["reg_tokens"] = int(state["reg_token"].shape[1])
    if "blocks.0.ls1.gamma" in state:
        kwargs["init_values"] = 1e-5  # any value: the gammas are loaded
    pos_embed = state.get("pos_embed")
    if pos_embed is not None:
        prefix = int(class_token) + kwargs.get("reg_tokens", 0)
        tokens = int(pos_embed.shape[1])
        if math.isqrt(tokens - prefix) ** 2 == tokens - prefix:
            side = _square_side(tokens - prefix, "pos_embed")
        else:  # position embedding without the prefix tokens (timm no_embed_class)
            side = _square_side(tokens, "pos_embed")
            kwargs["no_embed_class"] = True
        kwargs["img_size"] = (side * patch[0], side * patch[1]) if patch[0] != patch[1] else side * patch[0]
    else:
        kwargs["pos_embed"] = "none"
    kwargs.update(pool_kwargs(state, class_token))
    if kwargs["global_pool"] == "avg":
        kwargs["fc_norm"] = "fc_norm.weight" in state
    name = _VIT_NAMES.get((patch[0], embed_dim, depth), "vit_base_patch16_224")
    return ArchGuess(name, kwargs)


def rel_table_facts(state: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
    """(heads, window side) from any relative position bias table [(2s-1)² + 3, heads]."""
    table = next((value for key, value in state.items() if key.endswith("relative_position_bias_table")), None)
    if table is None:
        return None, None
    heads = int(table.shape[1])
    span = _square_side(int(table.shape[0]) - 3, "relative_position_bias_table")
    return heads, (span + 1) // 2


def infer_beit_arch(
    state: Mapping[str, Tensor], source: str, *, num_heads: int | None = None, num_heads_hint: int | None = None
) -> ArchGuess:
    """A timm ``Beit`` matching ``state`` (BEiT and SimMIM): q/v biases, layer scale, relative bias."""
    embed_dim, patch, in_chans = _patch_facts(state, source)
    depth = _depth(state)
    heads_in_table, window = rel_table_facts(state)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if "blocks.0.mlp.fc1_g.weight" in state:
        raise CheckpointError(f"{source}: SwiGLU MLP blocks (BEiT v3 / EVA style) are not supported here")
    kwargs: dict[str, Any] = {
        "embed_dim": embed_dim,
        "depth": depth,
        "patch_size": patch[0] if patch[0] == patch[1] else patch,
        "in_chans": in_chans,
        "qkv_bias": "blocks.0.attn.q_bias" in state,
        "use_abs_pos_emb": "pos_embed" in state,
        "use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in state,
        "use_rel_pos_bias": "blocks.0.attn.relative_position_bias_table" in state,
        "init_values": 0.1 if "blocks.0.gamma_1" in state else None,
        "num_heads": resolve_num_heads(
            source, embed_dim, override=num_heads, hint=num_heads_hint, from_shapes=heads_in_table
        ),
    }
    if fc1 is not None:
        kwargs["mlp_ratio"] = fc1.shape[0] / embed_dim
    if "pos_embed" in state:
        side = _square_side(int(state["pos_embed"].shape[1]) - 1, "pos_embed")
    elif window is not None:
        side = window
    else:
        raise CheckpointError(f"{source}: neither pos_embed nor a relative position bias table; pass img_size=")
    kwargs["img_size"] = side * patch[0]
    kwargs.update(pool_kwargs(state, class_token=True))
    name = _BEIT_NAMES.get((patch[0], embed_dim, depth), "beit_base_patch16_224")
    return ArchGuess(name, kwargs)


def checkpoint_img_size(state: Mapping[str, Tensor]) -> int | None:
    """The (square) image size a ViT/BEiT state dict was built for, from its position grid; None if unknown."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return None
    patch = int(weight.shape[2])
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and pos_embed.ndim == 3:
        tokens = int(pos_embed.shape[1])
        prefix = int("cls_token" in state) + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0)
        for count in (tokens - prefix, tokens):
            if count > 0 and math.isqrt(count) ** 2 == count:
                return math.isqrt(count) * patch
        return None
    try:
        _, window = rel_table_facts(state)
    except CheckpointError:
        return None
    return window * patch if window is not None else None


def infer_arch(converted: Converted, source: str, num_heads: int | None = None) -> ArchGuess:
    infer = infer_beit_arch if converted.family == "beit" else infer_vit_arch
    return infer(converted.state_dict, source, num_heads=num_heads, num_heads_hint=converted.num_heads_hint)
