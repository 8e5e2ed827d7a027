"""Load the models researchers have: timm names, official SSL checkpoints, plain files — safely.

``load_model(spec, **options) -> nn.Module`` returns a timm model in eval mode with a
:class:`LoadReport` attached as ``model.vitscope_load_report``. Spec kinds (see :mod:`.specs`):

- ``timm:NAME``: timm's pretrained weights from the local cache (Hugging Face hub or torch hub) or
  ``weights=PATH``; never downloaded: absent weights raise :class:`WeightsNotFoundError` saying what
  to download and where to put it.
- ``random:NAME``: random init (seeded by ``seed=``, default 0), an untrained control; timm kwargs
  (``img_size``, ``depth``...) pass through.
- ``moco-v3:PATH``, ``mae:PATH``, ``simmim:PATH``, ``dino:PATH``, ``beit:PATH``: official checkpoints,
  converted by :mod:`.converters` onto timm ``VisionTransformer`` (MoCo v3, MAE, DINO) or ``Beit``
  (SimMIM, BEiT), the architecture inferred from the tensors' shapes (override with ``arch=``,
  ``num_heads=`` and timm kwargs). ``part=`` picks MoCo v3's ``base``/``momentum`` encoder or DINO's
  ``teacher``/``student``.
- ``file:PATH``: a timm-named state dict (``.pth``/``.pt``/``.bin``/``.safetensors``) with ``arch=NAME``,
  or with a model card (``encoder.json``, :mod:`.cards`) beside it as ``vitscope pretrain`` writes;
  PATH may also be a run directory holding ``encoder.safetensors``.
- ``bundled:NAME``: a model shipped in ``vitscope/bundled/`` (see :mod:`.cards`).
- ``hf:REPO_ID_OR_DIR``: a Hugging Face ``transformers`` vision encoder from a ``save_pretrained``
  directory or the local Hugging Face cache (:mod:`.hf`; extra ``vitscope[hf]``).
- ``open_clip:ARCH?pretrained=FILE``: the visual tower of an OpenCLIP model (:mod:`.openclip`; extra
  ``vitscope[openclip]``).

Options common to all: ``strict`` (default True: an encoder weight left at random init, an unused or
mis-shaped checkpoint weight is an error naming the keys; a classifier head (``head.*``, ``fc_norm.*``)
the checkpoint lacks stays random and is listed as missing), ``seed``; the remaining keyword arguments
go to ``timm.create_model``. Files are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from torch import Tensor, nn

from vitscope.models.build import create_timm_model, load_into
from vitscope.models.cards import card_beside, find, read_card
from vitscope.models.converters import (
    SOURCES,
    Converted,
    checkpoint_img_size,
    convert,
    infer_arch,
    pool_kwargs,
    rel_table_facts,
    resolve_num_heads,
)
from vitscope.models.load_report import LoadReport, WeightsNotFoundError
from vitscope.models.safe_load import read_checkpoint, read_state_dict
from vitscope.models.specs import CHECKPOINT_KINDS, ModelSpec, option_bool, parse_spec
from vitscope.models.timm_weights import locate_timm_weights

__all__ = ["load_model", "ENCODER_FILE"]

ENCODER_FILE = "encoder.safetensors"  # what `vitscope pretrain` writes in its run directory


def load_model(spec: str | ModelSpec, **options: Any) -> nn.Module:
    """Load the model ``spec`` names (see the module docstring); eval mode, report attached.

    Raises:
        ValueError: a malformed spec or option.
        FileNotFoundError: a checkpoint path that does not exist (:class:`WeightsNotFoundError` for
            timm weights absent from the local cache).
        UnsafeCheckpointError: a file whose unpickling would construct arbitrary objects.
        CheckpointMismatchError: weights that do not fit the model (with ``strict=True``).
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    opts = {**parsed.options, **options}
    strict = option_bool(opts.pop("strict", True), "strict")
    seed = opts.pop("seed", 0)
    if parsed.kind == "random":
        model, report = _load_random(parsed, opts, seed)
    elif parsed.kind == "timm":
        model, report = _load_timm(parsed, opts, strict, seed)
    elif parsed.kind in CHECKPOINT_KINDS:
        model, report = _load_official(parsed, opts, strict, seed)
    elif parsed.kind == "file":
        model, report = _load_file(parsed, Path(parsed.target), opts, strict, seed)
    elif parsed.kind == "hf":
        from vitscope.models.hf import load_hf

        model, report = load_hf(parsed, opts, strict, seed)
    elif parsed.kind == "open_clip":
        from vitscope.models.openclip import load_open_clip

        model, report = load_open_clip(parsed, opts, strict, seed)
    else:  # bundled
        model, report = _load_bundled(parsed, opts, strict, seed)
    model.eval()
    model.vitscope_load_report = report  # type: ignore[assignment]  # torch stub: a Module attribute may hold any value
    report.log()
    return model


def _reject(parsed: ModelSpec, opts: Mapping[str, Any], names: tuple[str, ...], why: str) -> None:
    given = [name for name in names if opts.get(name) is not None]
    if given:
        raise ValueError(f"{parsed.text or parsed.kind}: option {given[0]}= is not used here ({why})")


def _load_random(parsed: ModelSpec, opts: dict[str, Any], seed: Any) -> tuple[nn.Module, LoadReport]:
    _reject(parsed, opts, ("weights", "arch", "part"), "random:NAME builds NAME untrained")
    model = create_timm_model(parsed.target, opts, seed=seed, context=parsed.text)
    report = LoadReport(
        spec=parsed.text,
        source="random",
        arch=parsed.target,
        arch_kwargs=dict(opts),
        notes=[f"random initialisation (seed={seed}); no weights loaded"],
    )
    return model, report


def _load_timm(parsed: ModelSpec, opts: dict[str, Any], strict: bool, seed: Any) -> tuple[nn.Module, LoadReport]:
    _reject(parsed, opts, ("arch", "part"), "timm:NAME names the architecture")
    weights = opts.pop("weights", None)
    name = parsed.target
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{parsed.text}: weights file not found: {path}")
    else:
        location = locate_timm_weights(name)
        if location.path is None:
            raise WeightsNotFoundError(
                f"{parsed.text}: pretrained weights are not on this machine and vitscope "
                f"never downloads them. {location.download_hint()}"
            )
        path = location.path
    model = create_timm_model(name, opts, seed=seed, context=parsed.text)
    report = LoadReport(spec=parsed.text, source="timm", path=str(path), arch=name, arch_kwargs=dict(opts))
    state = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    _drop_unfit_classifier(state, model, report)
    load_into(model, state, report, strict=strict)
    return model, report


def _drop_unfit_classifier(state: dict[str, Tensor], model: nn.Module, report: LoadReport) -> None:
    """A pretrained classifier that the model was built without (num_classes=0) or with another size."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    target = model.state_dict()
    for name in (names,) if isinstance(names, str) else tuple(names):
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in state and (key not in target or state[key].shape != target[key].shape):
                report.dropped.append(key)
                del state[key]
    if report.dropped:
        report.notes.append("pretrained classifier not loaded: the model was built with another num_classes")


def _load_official(parsed: ModelSpec, opts: dict[str, Any], strict: bool, seed: Any) -> tuple[nn.Module, LoadReport]:
    _reject(parsed, opts, ("weights",), f"{parsed.kind}:PATH is the weights file")
    source, path = parsed.kind, Path(parsed.target).expanduser()
    arch, num_heads, part = opts.pop("arch", None), opts.pop("num_heads", None), opts.pop("part", None)
    converted = convert(source, read_checkpoint(path), part=part)
    if arch is None:
        guess = infer_arch(converted, source, num_heads=num_heads)
        arch, model_kwargs = guess.arch, guess.kwargs
    else:
        model_kwargs = _kwargs_for_named_arch(converted, source, num_heads)
    model_kwargs.update(opts)
    facts = SOURCES[source]
    report = LoadReport(
        spec=parsed.text,
        source=source,
        path=str(path),
        arch=arch,
        arch_kwargs=model_kwargs,
        dropped=list(converted.dropped),
        notes=list(converted.notes),
    )
    model = create_timm_model(
        arch, model_kwargs, seed=seed, context=parsed.text, cfg_overlay={"mean": facts.mean, "std": facts.std}
    )
    if "num_heads" not in model_kwargs:
        heads = "?"
        if hasattr(model, "blocks"):
            first = cast("nn.Sequential | nn.ModuleList", model.blocks)[0]
            heads = getattr(getattr(first, "attn", None), "num_heads", "?")
        report.notes.append(f"head count {heads} is {arch}'s default: the checkpoint does not show it")
    load_into(model, converted.state_dict, report, strict=strict)
    return model, report


def _kwargs_for_named_arch(converted: Converted, source: str, num_heads: int | None) -> dict[str, Any]:
    """With ``arch=`` given: keep its structure, set heads (when known), classifier and pooling."""
    state = converted.state_dict
    patch = state.get("patch_embed.proj.weight")
    heads_in_table, _ = rel_table_facts(state)
    heads = resolve_num_heads(
        source,
        int(patch.shape[0]) if patch is not None else -1,
        override=num_heads,
        hint=converted.num_heads_hint,
        from_shapes=heads_in_table,
        required=False,
    )
    kwargs = pool_kwargs(state, class_token="cls_token" in state)
    if heads is not None:
        kwargs["num_heads"] = heads
    return kwargs


def _load_file(
    parsed: ModelSpec,
    path: Path,
    opts: dict[str, Any],
    strict: bool,
    seed: Any,
    cfg_overlay: Mapping[str, Any] | None = None,
    source: str = "file",
) -> tuple[nn.Module, LoadReport]:
    _reject(parsed, opts, ("weights", "part"), f"{parsed.kind}: names the weights file")
    path = path.expanduser()
    if path.is_dir():
        if not (path / ENCODER_FILE).is_file():
            raise FileNotFoundError(
                f"{parsed.text}: {path} is a directory without {ENCODER_FILE} "
                "(give the weights file, or a `vitscope pretrain` run directory)"
            )
        path = path / ENCODER_FILE
    elif not path.is_file():
        raise FileNotFoundError(f"{parsed.text}: no such file: {path}")
    arch = opts.pop("arch", None)
    card = card_beside(path) if not arch else None  # `vitscope pretrain` writes encoder.json beside
    sidecar = read_card(card) if card is not None else None
    if sidecar is not None:
        arch, opts = sidecar["arch"], {**sidecar.get("arch_kwargs", {}), **opts}
        overlay = {key: tuple(sidecar[key]) for key in ("mean", "std") if sidecar.get(key)}
        cfg_overlay = {**overlay, **(cfg_overlay or {})}
    if not arch:
        raise ValueError(
            f"{parsed.text}: file:PATH needs arch=NAME, the timm model the weights belong to "
            "(e.g. file:weights.safetensors?arch=vit_small_patch16_224), or an encoder.json "
            "beside it as `vitscope pretrain` writes"
        )
    state = read_state_dict(path)
    model_kwargs = {**_file_defaults(arch, state), **opts}
    report = LoadReport(spec=parsed.text, source=source, path=str(path), arch=arch, arch_kwargs=model_kwargs)
    model = create_timm_model(arch, model_kwargs, seed=seed, context=parsed.text, cfg_overlay=cfg_overlay)
    load_into(model, state, report, strict=strict)
    return model, report


def _file_defaults(arch: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """num_classes from the file's classifier (0 when it has none); img_size from its position grid."""
    from timm.models import get_pretrained_cfg

    kwargs: dict[str, Any] = {}
    cfg = get_pretrained_cfg(arch)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(classifier, str):
        weight = state.get(f"{classifier}.weight")
        kwargs["num_classes"] = int(weight.shape[0]) if weight is not None else 0
    img_size = checkpoint_img_size(state)
    if img_size is not None:
        kwargs["img_size"] = img_size
    return kwargs


def _load_bundled(parsed: ModelSpec, opts: dict[str, Any], strict: bool, seed: Any) -> tuple[nn.Module, LoadReport]:
    bundled = find(parsed.target)
    overlay: dict[str, tuple[float, ...]] = {
        key: tuple(bundled.card[key]) for key in ("mean", "std") if key in bundled.card
    }
    merged = {**bundled.arch_kwargs, **opts, "arch": opts.get("arch") or bundled.arch}
    model, report = _load_file(parsed, bundled.weights, merged, strict, seed, cfg_overlay=overlay, source="bundled")
    report.notes.append(f"bundled model card: {bundled.weights.with_suffix('.json').name}")
    return model, report
