"""Load a Hugging Face ``transformers`` vision encoder (``hf:REPO_ID_OR_DIR``) from this machine only.

Where the files come from:
    - a directory written by ``save_pretrained`` (``config.json`` + weights), or
    - a repo id already in the local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``); nothing
      is downloaded: an absent repo is a :class:`WeightsNotFoundError` saying what to run on a machine
      that is online. Option ``revision=`` picks a cached branch, tag or commit.

What is built: the encoder class ``AutoModel`` maps the config to; for a model with a vision tower
(CLIP, SigLIP: a ``vision_config``) the tower's class (``CLIPVisionModel``...), the other towers'
weights dropped and listed in ``report.dropped``. Eager attention (so that attention probabilities
exist), float32, eval mode. ViTMAE gets ``mask_ratio = 0``: the encoder sees every patch.

Strict like the rest of vitscope: an encoder weight missing from the checkpoint (it would stay at
random init) or of another shape is a :class:`CheckpointMismatchError` naming the keys, unless
``strict=False``. Checkpoint weights the encoder has no place for are listed (``dropped`` for heads,
decoders and text towers, ``unexpected`` for the rest). A pooler absent from the checkpoint (DINO,
MAE) is removed rather than left random. Weights are read by transformers with safetensors or
``torch.load(weights_only=True)``; remote code is never trusted.

Preprocessing: the model's own image processor (``preprocessor_config.json`` beside the weights), else
the family's processor class with its defaults scaled to the config's ``image_size``; attached with
:func:`~vitscope.data.transforms.attach_preprocess` (PIL image -> [3, H, W] float tensor).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from vitscope.data.decode import to_rgb
from vitscope.data.transforms import Preprocess, attach_preprocess
from vitscope.models.build import seeded
from vitscope.models.load_report import CheckpointMismatchError, LoadReport, WeightsNotFoundError, mismatch_message
from vitscope.models.specs import ModelSpec
from vitscope.models.timm_weights import hf_cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["load_hf", "HFImageTransform", "locate_hf_model"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Checkpoint parts that are not the vision encoder: other towers, heads, decoders.
_NOT_ENCODER = (
    "text_model.",
    "text_projection.",
    "visual_projection.",
    "logit_scale",
    "logit_bias",
    "decoder.",
    "classifier.",
    "cls_classifier.",
    "distillation_classifier.",
    "lm_head.",
)
# Families whose image processor is registered under another model type.
_PROCESSOR_TYPE = {
    "dinov2_with_registers": "dinov2",
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OPTIONS = ("revision",)


def load_hf(parsed: ModelSpec, opts: dict[str, Any], strict: bool, seed: Any) -> tuple[nn.Module, LoadReport]:
    """Build and fill the encoder ``parsed.target`` names (see the module docstring); eval mode, transform attached.

    Raises:
        WeightsNotFoundError: a repo id absent from the local Hugging Face cache.
        FileNotFoundError: a directory that does not exist or holds no ``config.json``.
        CheckpointMismatchError: encoder weights missing or of another shape (with ``strict``).
        UnsupportedModelError: an encoder vitscope cannot capture (Siglip2VisionModel), with the reason.
        ValueError: an option ``hf:`` does not take, a config transformers has no model class for, or no way
            to tell the input size.
    """
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ValueError(
            f"{parsed.text}: option {unknown[0]}= is not used by hf: specs (options: {', '.join(_OPTIONS)})"
        )
    revision = opts.get("revision")
    folder = locate_hf_model(parsed.target, revision=None if revision is None else str(revision), context=parsed.text)
    config, encoder_config, model_class = _encoder_class(folder, parsed.text)
    _refuse_uncapturable(model_class.__name__, parsed.text)
    report = LoadReport(
        spec=parsed.text,
        source="hf",
        path=str(folder),
        arch=model_class.__name__,
        arch_kwargs=_config_facts(encoder_config),
    )
    if encoder_config is not config:
        report.notes.append(f"vision tower {model_class.__name__} of a {type(config).__name__} checkpoint")
    if getattr(encoder_config, "mask_ratio", 0.0):
        report.notes.append(f"mask_ratio {encoder_config.mask_ratio} -> 0: the encoder sees every patch")
        encoder_config.mask_ratio = 0.0
    model, info = _from_pretrained(model_class, folder, encoder_config, seed)
    _fill_report(report, model, info)
    if strict and (report.missing or report.mismatched):
        raise CheckpointMismatchError(
            mismatch_message(
                f"{report.path} does not fit {report.arch} {report.arch_kwargs}:",
                mismatched=report.mismatched,
                missing=report.missing,
                advice="Check config.json against the weights, or pass strict=False (hf:...?strict=false) "
                "to load what fits.",
            )
        )
    model.eval()
    attach_preprocess(model, _preprocess(folder, config, encoder_config))
    return model, report


# -- where the files are -------------------------------------------------------------------------------


def locate_hf_model(target: str, *, revision: str | None = None, context: str = "") -> Path:
    """The folder holding ``config.json`` and weights: ``target`` itself, or its snapshot in the local cache.

    Raises:
        FileNotFoundError: a path that is not a ``save_pretrained`` directory.
        WeightsNotFoundError: a repo id that is not (completely) in the local cache.
    """
    where = f"{context or target}: "
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{where}{path} has no config.json (expected a directory written by save_pretrained)"
            )
        return path
    if target.startswith(("/", ".", "~")) or not _REPO_ID.match(target):
        raise FileNotFoundError(f"{where}no such directory: {path} (and it is not a Hugging Face repo id)")
    snapshot = _cached_snapshot(target, revision)
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise WeightsNotFoundError(
            f"{where}{target} is not in the local Hugging Face cache{_revision_text(revision)} (nor a directory "
            f"here). {_download_hint(target)}"
        )
    if not any((snapshot / name).is_file() for name in _WEIGHT_FILES):
        raise WeightsNotFoundError(
            f"{where}the cached snapshot {snapshot} of {target} has no weights ({', '.join(_WEIGHT_FILES)}). "
            f"{_download_hint(target)}"
        )
    return snapshot


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    try:
        found = snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    return Path(str(found))


def _revision_text(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def _download_hint(repo: str) -> str:
    cache = hf_cache_dir()
    return (
        f"vitscope never downloads. On a machine that is online run `hf download {repo}` (older huggingface_hub: "
        f"`huggingface-cli download {repo}`) with HF_HUB_CACHE={cache}, then copy the folder "
        f"models--{repo.replace('/', '--')} into {cache} here; or save the model there with "
        "save_pretrained(DIR) (and its image processor) and use hf:DIR"
    )


# -- the model -------------------------------------------------------------------------------------------


def _encoder_class(folder: Path, context: str) -> tuple[Any, Any, type[PreTrainedModel]]:
    """(checkpoint config, encoder config, encoder class): the vision tower's for multi-tower models."""
    from transformers import AutoConfig, AutoModel

    raw = json.loads((folder / "config.json").read_text())
    if "model_type" not in raw and "architecture" in raw:
        raise ValueError(
            f"{context}: {folder} holds a timm model ({raw['architecture']}), not a transformers one: load it with "
            f"timm:{raw['architecture']}?weights=FILE (FILE: the weights file in that folder)"
        )
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    encoder_config = getattr(config, "vision_config", None) or config
    mapping = AutoModel._model_mapping  # config class -> base model class, as AutoModel.from_config uses it
    try:
        return config, encoder_config, cast("type[PreTrainedModel]", mapping[type(encoder_config)])
    except KeyError:
        raise ValueError(
            f"{context}: transformers has no base model class for {type(encoder_config).__name__} "
            f"(model_type {encoder_config.model_type!r})"
        ) from None


def _refuse_uncapturable(class_name: str, context: str) -> None:
    """An encoder vitscope knows it cannot capture is refused before it is built, with the reason."""
    from vitscope.capture.blocks import UnsupportedModelError
    from vitscope.capture.hf import REFUSED

    reason = REFUSED.get(class_name)
    if reason is not None:
        raise UnsupportedModelError(f"{context}: {class_name}: {reason}")


def _from_pretrained(
    model_class: type[PreTrainedModel], folder: Path, config: Any, seed: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """``from_pretrained`` offline, eager attention, float32, safe reads; (model, transformers' loading info)."""
    with _quiet_transformers(), seeded(seed):
        loaded: Any = model_class.from_pretrained(
            str(folder),
            config=config,
            output_loading_info=True,
            attn_implementation="eager",
            ignore_mismatched_sizes=True,  # mismatches are reported (and refused) by the caller, with names and shapes
            local_files_only=True,
            trust_remote_code=False,
            weights_only=True,
            dtype=torch.float32,
        )
    model, info = loaded
    return model, info


def _config_facts(config: Any) -> dict[str, Any]:
    """A few config facts for the report; ``img_size`` as timm names it (``model_input_size`` reads it)."""
    facts: dict[str, Any] = {"model_type": config.model_type}
    for name, key in (
        ("image_size", "img_size"),
        ("patch_size", "patch_size"),
        ("hidden_size", "hidden_size"),
        ("num_hidden_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("num_register_tokens", "num_register_tokens"),
    ):
        value = getattr(config, name, None)
        if value is not None:
            facts[key] = value
    return facts


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own load table and progress bar off while loading (the LoadReport says it all)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _fill_report(report: LoadReport, model: nn.Module, info: dict[str, Any]) -> None:
    """Missing, mismatched, dropped and unexpected keys from transformers' loading info (model key names)."""
    missing = sorted(info.get("missing_keys", ()))
    pooler = [key for key in missing if key.startswith("pooler.")]
    if pooler and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None  # type: ignore[assignment]  # transformers' encoders skip a None pooler
        report.notes.append("the checkpoint has no pooler: removed (pooler_output is None)")
        missing = [key for key in missing if key not in pooler]
    report.missing = missing
    report.mismatched = [
        f"{key}: checkpoint {tuple(old)} vs model {tuple(new)}"
        for key, old, new in sorted(info.get("mismatched_keys", ()))
    ]
    unused = sorted(info.get("unexpected_keys", ()))
    report.dropped = [key for key in unused if key.startswith(_NOT_ENCODER)]
    report.unexpected = [key for key in unused if not key.startswith(_NOT_ENCODER)]
    if report.dropped:
        report.notes.append(
            "not part of the vision encoder: " + ", ".join(sorted({k.split(".")[0] for k in report.dropped}))
        )
    report.notes.extend(str(message) for message in info.get("error_msgs", ()))
    report.loaded = len(model.state_dict()) - len(report.missing) - len(report.mismatched)


# -- preprocessing -------------------------------------------------------------------------------------


class HFImageTransform:
    """A ``transformers`` image processor as an eval transform: PIL image -> pixel values [3, H, W] (float32)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        if hasattr(image, "mode"):  # a PIL image of any mode: upright 8-bit RGB, as a viewer shows it
            image = to_rgb(image)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:  # equal settings, equal text: models sharing a pipeline share one view of each image
        settings = self.processor.to_json_string()
        digest = hashlib.sha1(settings.encode()).hexdigest()[:10]
        return f"HFImageTransform({type(self.processor).__name__}, {_processor_size(self.processor)}, {digest})"


def _processor_size(processor: Any) -> str:
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None)
    if size is None:
        return "?"
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    return f"{height}x{width}" if height else str(getattr(size, "shortest_edge", size))


def _preprocess(folder: Path, config: Any, encoder_config: Any) -> Preprocess:
    """The checkpoint's own image processor, else the family's default one sized to the config's image_size."""
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    else:
        image_size = getattr(encoder_config, "image_size", None)
        if image_size is None:
            raise ValueError(
                f"{folder}: config.json gives no image_size and no preprocessor_config.json lies beside it, so the "
                "input size is unknown (save the model's image processor there with save_pretrained)"
            )
        processor = _default_processor(config.model_type, _pair(image_size))
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocess(HFImageTransform(processor), mean, std)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _default_processor(model_type: str, image_size: tuple[int, int]) -> Any:
    """The family's processor class (ViT's when unknown), its resize/crop ratio kept, cropping to ``image_size``."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(_PROCESSOR_TYPE.get(model_type, model_type)) or {}
    processor_class = getattr(transformers, names.get("torchvision") or names.get("pil") or "ViTImageProcessor")
    defaults = processor_class()
    height, width = image_size
    crop = getattr(defaults, "crop_size", None) if getattr(defaults, "do_center_crop", False) else None
    if crop is None:
        return processor_class(size={"height": height, "width": width})
    size = defaults.size
    if getattr(size, "shortest_edge", None):
        resize: dict[str, int] = {"shortest_edge": round(min(height, width) * size.shortest_edge / crop.height)}
    else:
        resize = {"height": round(height * size.height / crop.height), "width": round(width * size.width / crop.width)}
    return processor_class(size=resize, crop_size={"height": height, "width": width})
