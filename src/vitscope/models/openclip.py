"""The visual tower of an OpenCLIP model: ``open_clip:ARCH?pretrained=FILE`` (extra ``vitscope[openclip]``).

``ARCH`` is an OpenCLIP model config name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, anything
``open_clip.list_models()`` lists, ``/`` read as ``-``) or ``local-dir:DIR`` for a directory holding
``open_clip_config.json`` and its weights (a downloaded Hugging Face repo). Only the visual tower is
built (``open_clip.model._build_vision_tower``, as ``CLIP`` builds it): no text tower, nothing fetched.

Options:
    pretrained (alias weights): a local checkpoint file (``.safetensors``, or a ``.bin``/``.pt``/``.pth``
        state dict read with ``torch.load(weights_only=True)``; open_clip never unpickles it). A full
        CLIP state dict (``visual.*`` keys plus the text tower) or the tower's own state dict. Without
        it the tower is random-init (seeded). vitscope never downloads: a pretrained *tag*
        (``laion2b_s34b_b79k``) is an error saying which file to fetch.
    tag: the OpenCLIP pretrained tag the file was trained as; its preprocessing (mean, std,
        interpolation, resize mode) and QuickGELU setting are used, as open_clip would.
    image_size (alias img_size): build the tower for another input size (position embeddings of a
        checkpoint are resized bicubically, as open_clip does).
    quick_gelu: override the config's activation (OpenAI's weights need QuickGELU: ``ViT-B-32-quickgelu``
        or ``tag=openai`` or ``quick_gelu=true``).
    mean, std, interpolation, resize_mode: override the preprocessing.

Loading is strict by default: a tower weight the file lacks, a file weight the tower has no place for,
or a shape mismatch is a :class:`CheckpointMismatchError` naming the keys (``strict=False`` loads what
fits). The text tower's weights, ``logit_scale`` and ``logit_bias`` are dropped and listed in
``report.dropped``. OpenCLIP's own eval transform (``open_clip.image_transform``) is attached with
:func:`vitscope.data.transforms.attach_preprocess`.
"""

from __future__ import annotations

import difflib
import json
import os
import posixpath
from copy import deepcopy
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

from torch import Tensor, nn

from vitscope.data.transforms import Preprocess, attach_preprocess
from vitscope.models.build import compare_keys, seeded
from vitscope.models.load_report import CheckpointMismatchError, LoadReport, WeightsNotFoundError, mismatch_message
from vitscope.models.safe_load import read_state_dict
from vitscope.models.specs import ModelSpec, option_bool

__all__ = ["load_open_clip", "split_visual_state"]

_OPTIONS = ("pretrained", "weights", "tag", "image_size", "img_size", "quick_gelu") + (
    "mean",
    "std",
    "interpolation",
    "resize_mode",
)
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_CHECKPOINT_NAMES = (  # in the order open_clip prefers them in a model directory
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_TEXT_ONLY = ("logit_scale", "logit_bias")


def _import_open_clip() -> ModuleType:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"open_clip: specs need the open_clip_torch package: pip install 'vitscope[openclip]' ({err})"
        ) from None
    return open_clip


def load_open_clip(parsed: ModelSpec, opts: dict[str, Any], strict: bool, seed: Any) -> tuple[nn.Module, LoadReport]:
    """Build ``model.visual`` of OpenCLIP config ``parsed.target`` and fill it from ``pretrained=``.

    Returns the tower (eval mode, OpenCLIP's eval transform attached) and its :class:`LoadReport`.

    Raises:
        ValueError: an unknown ARCH, tag or option.
        FileNotFoundError: a ``pretrained=`` file that does not exist; :class:`WeightsNotFoundError`
            for a pretrained tag (vitscope never downloads; the message says which file to fetch).
        CheckpointMismatchError: visual weights missing, unexpected or mis-shaped (``strict=True``).
    """
    open_clip = _import_open_clip()
    opts = dict(opts)
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"{parsed.text}: unknown option {unknown[0]}=; open_clip: specs take {', '.join(_OPTIONS)}")
    arch, model_cfg, dir_preprocess, dir_weights = _resolve_arch(parsed, open_clip)
    tag = opts.get("tag")
    tag_cfg = _tag_config(parsed, open_clip, arch, str(tag)) if tag else {}
    path = _resolve_weights(parsed, open_clip, arch, _pretrained_option(parsed, opts)) or dir_weights
    vision_cfg, quick_gelu, arch_kwargs = _vision_config(model_cfg, opts, tag_cfg)
    with seeded(seed):
        visual = _build_tower(parsed, open_clip, int(model_cfg["embed_dim"]), vision_cfg, quick_gelu)
    arch_kwargs["img_size"] = _image_size(visual)
    report = LoadReport(
        spec=parsed.text, source="open_clip", path=str(path) if path else None, arch=arch, arch_kwargs=arch_kwargs
    )
    if path is None:
        report.notes.append(f"random initialisation (seed={seed}); no weights loaded")
    else:
        _load_weights(visual, read_state_dict(path), report, strict)
    _fit_timm_trunk(parsed, visual, report)
    attach_preprocess(visual, _preprocess(open_clip, visual, arch, [dir_preprocess, tag_cfg, opts], report))
    return visual.eval(), report


# ----------------------------------------------------------------------------- architecture
def _resolve_arch(parsed: ModelSpec, open_clip: ModuleType) -> tuple[str, dict[str, Any], dict[str, Any], Path | None]:
    """(name, model config, preprocessing from a model directory, weights file in it) for ``parsed.target``."""
    target = parsed.target.strip()
    if target.startswith("hf-hub:"):
        repo = target[len("hf-hub:") :]
        raise WeightsNotFoundError(
            f"{parsed.text}: 'hf-hub:' fetches from the Hugging Face Hub and vitscope never downloads. Download "
            f"the repo (huggingface-cli download {repo}) and use open_clip:local-dir:DIR with its directory"
        )
    if target.startswith("local-dir:"):
        return _local_dir(parsed, Path(target[len("local-dir:") :]).expanduser())
    name = target.replace("/", "-")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else "; see open_clip.list_models()"
        raise ValueError(f"{parsed.text}: unknown OpenCLIP model config {name!r}{hint}")
    return name, model_cfg, {}, None


def _local_dir(parsed: ModelSpec, directory: Path) -> tuple[str, dict[str, Any], dict[str, Any], Path | None]:
    config_file = directory / "open_clip_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{parsed.text}: no open_clip_config.json in {directory}")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_cfg = config.get("model_cfg", config)
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise ValueError(
            f"{config_file}: expected an OpenCLIP config with model_cfg.embed_dim and model_cfg.vision_cfg"
        )
    preprocess = config.get("preprocess_cfg") or {}
    return f"local-dir:{directory}", model_cfg, dict(preprocess), _checkpoint_in(directory)


def _checkpoint_in(directory: Path) -> Path | None:
    """The weights file of a model directory, by open_clip's preferred names, else its only checkpoint."""
    for name in _CHECKPOINT_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    return found[0] if len(found) == 1 else None


def _vision_config(
    model_cfg: dict[str, Any], opts: dict[str, Any], tag_cfg: dict[str, Any]
) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """The vision config with overrides applied, QuickGELU, and the overrides for the report."""
    vision_cfg = deepcopy(model_cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # a timm tower must not fetch its ImageNet weights
    overrides: dict[str, Any] = {}
    size = opts.get("image_size", opts.get("img_size"))
    if size is not None:
        vision_cfg["image_size"] = size if isinstance(size, int) else list(size)
        overrides["image_size"] = size
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if opts.get("quick_gelu") is not None:
        quick_gelu = option_bool(opts["quick_gelu"], "quick_gelu")
    elif "quick_gelu" in tag_cfg:
        quick_gelu = bool(tag_cfg["quick_gelu"])
    overrides["quick_gelu"] = quick_gelu
    if not vision_cfg.get("timm_model_name"):
        vision_cfg.pop("timm_model_pretrained")
    return vision_cfg, quick_gelu, overrides


def _image_size(visual: nn.Module) -> tuple[int, int] | None:
    """The (H, W) the tower was built for (open_clip keeps an int or a pair)."""
    size = getattr(visual, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def _build_tower(
    parsed: ModelSpec, open_clip: ModuleType, embed_dim: int, vision_cfg: dict[str, Any], quick_gelu: bool
) -> nn.Module:
    """``model.visual`` exactly as ``open_clip.model.CLIP`` builds it (fp32), without the text tower."""
    try:
        return cast(nn.Module, open_clip.model._build_vision_tower(embed_dim, vision_cfg, quick_gelu, None))
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"{parsed.text}: cannot build the visual tower from {vision_cfg}: {err}") from None


def _fit_timm_trunk(parsed: ModelSpec, visual: nn.Module, report: LoadReport) -> None:
    """A timm tower's trunk set to the tower's image size: open_clip builds the trunk at timm's default size
    whatever ``image_size`` says; timm's ``set_input_size`` resizes it (and resamples its position embedding,
    loaded weights included)."""
    trunk, size = getattr(visual, "trunk", None), _image_size(visual)
    built = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if not isinstance(trunk, nn.Module) or size is None or built is None or tuple(built) == size:
        return
    resize = getattr(trunk, "set_input_size", None)
    if not callable(resize):
        raise ValueError(
            f"{parsed.text}: the timm trunk {type(trunk).__name__} is built for {built[0]}x{built[1]} px and has no "
            f"set_input_size to take image_size {size[0]}x{size[1]}; leave image_size at the config's"
        )
    resize(img_size=size)
    report.resized.append(
        f"timm trunk input {built[0]}x{built[1]} -> {size[0]}x{size[1]} px "
        "(set_input_size, position embedding resampled)"
    )


# ----------------------------------------------------------------------------- weights
def _pretrained_option(parsed: ModelSpec, opts: dict[str, Any]) -> str | None:
    given = [opts[name] for name in ("pretrained", "weights") if opts.get(name) is not None]
    if len(given) > 1:
        raise ValueError(f"{parsed.text}: give pretrained= or weights=, not both")
    return str(given[0]) if given else None


def _resolve_weights(parsed: ModelSpec, open_clip: ModuleType, arch: str, pretrained: str | None) -> Path | None:
    """The local weights file ``pretrained`` names; never a download."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = _checkpoint_in(path)
        if found is None:
            raise FileNotFoundError(f"{parsed.text}: no checkpoint file in directory {path}")
        return found
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if not arch.startswith("local-dir:") else {}
    if tag_cfg:
        raise WeightsNotFoundError(_tag_message(parsed, arch, pretrained, tag_cfg))
    tags = open_clip.list_pretrained_tags_by_model(arch) if os.sep not in pretrained else []
    hint = f" (nor one of {arch}'s OpenCLIP tags: {', '.join(tags)})" if tags else ""
    raise FileNotFoundError(f"{parsed.text}: pretrained file not found: {path}{hint}")


def _tag_message(parsed: ModelSpec, arch: str, tag: str, cfg: dict[str, Any]) -> str:
    """Where the weights of an OpenCLIP tag are, and how to load them once fetched."""
    lead = f"{parsed.text}: {tag!r} is an OpenCLIP pretrained tag of {arch}, not a file; vitscope never downloads."
    follow = f"then load open_clip:{arch}?pretrained=PATH&tag={tag} (tag= sets its preprocessing and activation)"
    hub = str(cfg.get("hf_hub") or "")
    if hub:
        repo, filename = posixpath.split(hub)  # 'org/repo/' names the repo, 'org/repo/file' one file
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        cached = _in_hf_cache(repo, names)
        if cached is not None:
            return f"{lead} Its weights are in your Hugging Face cache: {cached}; {follow}"
        return (
            f"{lead} Fetch {' (or '.join(names)}{')' * (len(names) - 1)} from the Hugging Face Hub repo {repo} "
            f"(huggingface-cli download {repo} {names[0]}), {follow}"
        )
    if cfg.get("url"):
        return f"{lead} Fetch {cfg['url']}, {follow}"
    return f"{lead} open_clip knows no location for it; {follow}"


def _in_hf_cache(repo: str, filenames: list[str]) -> str | None:
    """A file of ``repo`` already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _tag_config(parsed: ModelSpec, open_clip: ModuleType, arch: str, tag: str) -> dict[str, Any]:
    cfg = {} if arch.startswith("local-dir:") else open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = [] if arch.startswith("local-dir:") else open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"{parsed.text}: tag={tag!r} is not an OpenCLIP tag of {arch}; known: {', '.join(tags)}")
    return dict(cfg)


def split_visual_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str]:
    """The visual tower's weights of a checkpoint, the keys dropped, and the prefix they had.

    A full CLIP state dict (``visual.*`` keys) gives its ``visual.`` entries without the prefix and
    drops the rest (text tower, ``logit_scale``); a tower's own state dict is taken whole.
    """
    if any(key.startswith("visual.") for key in state):
        visual = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
        return visual, [key for key in state if not key.startswith("visual.")], "visual."
    dropped = [key for key in state if key in _TEXT_ONLY]
    return {key: value for key, value in state.items() if key not in _TEXT_ONLY}, dropped, ""


def _load_weights(visual: nn.Module, state: dict[str, Tensor], report: LoadReport, strict: bool) -> None:
    """Compare ``state`` with the tower by name and shape; load it strictly (or what fits); fill ``report``."""
    weights, dropped, prefix = split_visual_state(state)
    report.dropped = dropped
    if dropped:
        report.notes.append(f"text tower / logit scale not loaded ({len(dropped)} tensors): vitscope analyses images")
    _resize_position_embedding(visual, weights, report)
    target = visual.state_dict()
    compare_keys(weights, target, report)
    if strict and not report.complete:
        named = f" (tower keys; the file has them under '{prefix}')" if prefix else ""
        raise CheckpointMismatchError(
            mismatch_message(
                f"{report.path} does not fit the visual tower of OpenCLIP {report.arch} {report.arch_kwargs}{named}:",
                mismatched=report.mismatched,
                missing=report.missing,
                unexpected=report.unexpected,
                where="tower",
                advice="Pick the OpenCLIP config the weights were trained with (open_clip:ARCH), set image_size= "
                "to theirs, or pass strict=False to load what fits.",
            )
        )
    fitting = {key: value for key, value in weights.items() if key in target and value.shape == target[key].shape}
    visual.load_state_dict(fitting, strict=False)
    report.loaded = len(fitting)


def _resize_position_embedding(visual: nn.Module, weights: dict[str, Tensor], report: LoadReport) -> None:
    """A checkpoint's position embedding resampled to the tower's grid (``image_size=``), as open_clip does."""
    from open_clip.model import resize_pos_embed

    old = weights.get("positional_embedding")
    own = getattr(visual, "positional_embedding", None)
    if old is None or not isinstance(own, Tensor) or old.ndim != 2 or old.shape == own.shape:
        return
    if old.shape[1] != own.shape[1]:
        return  # a width mismatch, reported as such
    state = {"visual.positional_embedding": old}
    resize_pos_embed(state, SimpleNamespace(visual=visual))
    weights["positional_embedding"] = state["visual.positional_embedding"]
    report.resized.append(f"positional_embedding: {old.shape[0]} -> {own.shape[0]} positions (bicubic)")


# ----------------------------------------------------------------------------- preprocessing
def _preprocess(
    open_clip: ModuleType, visual: nn.Module, arch: str, overlays: list[dict[str, Any]], report: LoadReport
) -> Preprocess:
    """OpenCLIP's eval transform at the tower's input size: open_clip's defaults, the preprocessing all
    of ARCH's tags share (if they agree), then the model directory's, the tag's and the options' values."""
    from open_clip.transform import PreprocessCfg

    defaults = PreprocessCfg()
    cfg: dict[str, Any] = {key: getattr(defaults, key) for key in _PREPROCESS_KEYS}
    shared, source = _shared_tag_preprocess(open_clip, arch), "open_clip's defaults"
    if shared:
        cfg.update(shared)
        source = f"shared by {arch}'s pretrained tags"
    for overlay in overlays:
        given = {key: overlay[key] for key in _PREPROCESS_KEYS if overlay.get(key) is not None}
        cfg.update(given)
        if given:
            source = "given"
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    size = _image_size(visual) or (224, 224)
    transform = open_clip.image_transform(
        size,
        is_train=False,
        mean=mean,
        std=std,
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )
    report.notes.append(
        f"preprocessing ({source}): {size[0]}x{size[1]}, mean={mean}, std={std}, "
        f"{cfg['interpolation']}, resize_mode={cfg['resize_mode']}"
    )
    return Preprocess(transform, mean, std)


def _shared_tag_preprocess(open_clip: ModuleType, arch: str) -> dict[str, Any]:
    """The preprocessing every pretrained tag of ``arch`` uses, or {} when they differ or there are none."""
    if arch.startswith("local-dir:"):
        return {}
    seen = set()
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        seen.add(tuple((key, _hashable(cfg.get(key))) for key in _PREPROCESS_KEYS))
    if len(seen) != 1:
        return {}
    return {key: value for key, value in next(iter(seen)) if value is not None}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
