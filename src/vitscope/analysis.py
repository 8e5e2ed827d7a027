"""The whole suite on several models: every analysis of SPEC.md from one pass per split.

:func:`analyze` walks the test images once, in lockstep over the models: each batch is transformed
for every model (its own timm data config), and each model's capture feeds all of that model's
reducers at once — the paper's metrics, CKA within the model and against every other model, probe
features, spatial localisation and the attention maps of a few query tokens. A second pass over
train images collects probe features. Then the per-layer linear probes are fitted, the last-layer
probe is scored under frequency-band noise, and the tokens of a few images are embedded with t-SNE.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import vitscope
from vitscope.capture import Capture, LayerOutput, make_capture
from vitscope.data import (
    Batch, SkipCounter, build_transform, collate_views, dataset_labels, open_dataset, stratified_subset,
)
from vitscope.embed import SpatialLocalisation, pick_examples, token_tsne
from vitscope.metrics.cka import CKAReducer, CrossModelCKA
from vitscope.metrics.reducers import ALL_METRICS, metric_reducers
from vitscope.metrics.stream import Reducer, run_reducers
from vitscope.noise import noise_robustness
from vitscope.probes import FeatureBank, ProbeConfig, linear_probe
from vitscope.results import Results

EXTRA_ANALYSES = ("linear_probe", "noise", "cka", "tsne", "attention_maps", "localisation")
ALL_ANALYSES = tuple(ALL_METRICS) + EXTRA_ANALYSES


@dataclass
class AnalysisConfig:
    """What to run and on how much data.

    Attributes:
        num_images: test images for the metrics, CKA and probe scoring (class-stratified, seeded).
        probe_train_images: train images for the linear probes.
        noise_images: test images scored under noise (a subset of the test images).
        noise_relative_norm: noise L2 norm per image as a root-mean-square per input value, in the
            model's normalised input space (0.5 ≈ 0.25 of the pixel range for mean/std 0.5 inputs).
        analyses: names from :data:`ALL_ANALYSES`; None = all.
    """

    num_images: int = 512
    probe_train_images: int = 2000
    noise_images: int = 256
    batch_size: int = 64
    device: str = "cpu"
    seed: int = 0
    analyses: Sequence[str] | None = None
    noise_bands: int = 5
    noise_relative_norm: float = 0.5
    probe_epochs: int = 100
    tsne_classes: int = 4
    tsne_per_class: int = 4
    attention_queries: int = 3
    num_workers: int = 0

    def wanted(self) -> set[str]:
        asked = set(ALL_ANALYSES if self.analyses is None else self.analyses)
        unknown = asked - set(ALL_ANALYSES)
        if unknown:
            raise ValueError(f"unknown analyses {sorted(unknown)}; choose from {', '.join(ALL_ANALYSES)}")
        return asked


@dataclass
class AnalysisOutput:
    results: Results
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- data views
class MultiView:
    """Apply several transforms to one image: one view per distinct model input pipeline."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image) -> tuple[Tensor, ...]:
        return tuple(transform(image) for transform in self.transforms)


def _view_index(transforms: Sequence[Callable]) -> tuple[list[Callable], list[int]]:
    """Deduplicate transforms by their printed form; return unique transforms and each model's view."""
    unique: dict[str, int] = {}
    views: list[Callable] = []
    index = []
    for transform in transforms:
        key = repr(transform)
        if key not in unique:
            unique[key] = len(views)
            views.append(transform)
        index.append(unique[key])
    return views, index


def split_indices(dataset_test: Dataset, dataset_train: Dataset, same_source: bool, num_test: int, num_train: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified test and train subsets; when both splits are one folder, they do not overlap."""
    test_labels = dataset_labels(dataset_test)
    test = stratified_subset(test_labels, num_test, seed, total=len(dataset_test))
    if not same_source:
        train = stratified_subset(dataset_labels(dataset_train), num_train, seed + 1, total=len(dataset_train))
        return test, train
    rest = np.setdiff1d(np.arange(len(dataset_test)), test)
    rest_labels = None if test_labels is None else test_labels[rest]
    train = rest[stratified_subset(rest_labels, num_train, seed + 1, total=len(rest))]
    return test, train


# ---------------------------------------------------------------------------- attention maps
class AttentionMaps(Reducer):
    """Head-averaged spatial attention of a few query tokens of the first image, per block.

    Keeps [L, Q, h, w] floats (Q query positions spread over the grid: centre first).
    """

    def __init__(self, num_queries: int = 3) -> None:
        self.num_queries = num_queries
        self.maps: list[Tensor] = []
        self.queries: list[tuple[int, int]] = []
        self._active = True

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._active = not self.maps

    def update(self, layer: LayerOutput) -> None:
        attn = layer.spatial_attn
        if not self._active or attn is None:
            return
        h, w = layer.grid
        if not self.queries:
            spots = [(h // 2, w // 2), (h // 4, w // 4), (3 * h // 4, 3 * w // 4), (h // 4, 3 * w // 4)]
            self.queries = spots[: self.num_queries]
        rows = torch.tensor([r * w + c for r, c in self.queries], device=attn.device)
        self.maps.append(attn[0].float().mean(dim=0)[rows].reshape(len(rows), h, w).cpu())

    def end_batch(self) -> None:
        self._active = False

    def arrays(self, label: str) -> dict[str, np.ndarray]:
        if not self.maps:
            return {}
        return {f"{label}/attention_maps": torch.stack(self.maps).numpy(),
                f"{label}/query_positions": np.array(self.queries, dtype=np.int64)}


# ---------------------------------------------------------------------------------- the suite
@dataclass
class _ModelRun:
    label: str
    spec: str
    model: nn.Module
    capture: Capture
    view: int
    reducers: list[Reducer] = field(default_factory=list)
    test_bank: FeatureBank | None = None
    train_bank: FeatureBank | None = None
    maps: AttentionMaps | None = None
    localisation: SpatialLocalisation | None = None
    image_hw: tuple[int, int] = (0, 0)


def _prepare(models: Mapping[str, nn.Module | str], device: str) -> list[_ModelRun]:
    from vitscope.models import load_model

    runs = []
    for label, spec_or_model in models.items():
        if isinstance(spec_or_model, nn.Module):
            model, spec = spec_or_model, type(spec_or_model).__name__
        else:
            model, spec = load_model(spec_or_model), spec_or_model
        model = model.to(device).eval()
        runs.append(_ModelRun(label, spec, model, make_capture(model), view=0))
    return runs


def _attach_reducers(runs: list[_ModelRun], wanted: set[str], config: AnalysisConfig) -> list[CrossModelCKA]:
    pairs: list[CrossModelCKA] = []
    for run in runs:
        facts = run.capture.facts
        run.reducers = metric_reducers(facts, [m for m in ALL_METRICS if m in wanted])
        if "linear_probe" in wanted:
            run.test_bank = FeatureBank.for_capture(run.capture)
            run.reducers.append(run.test_bank)
        if "cka" in wanted:
            run.reducers.append(CKAReducer())
        if "attention_maps" in wanted and facts.kind == "vit":
            run.maps = AttentionMaps(config.attention_queries)
            run.reducers.append(run.maps)
        if "localisation" in wanted and facts.kind == "vit":
            run.localisation = SpatialLocalisation(depth=facts.num_layers)
            run.reducers.append(run.localisation)
    if "cka" in wanted:
        for a, b in combinations(runs, 2):
            pair = CrossModelCKA(a.label, b.label)
            a.reducers.append(pair.side_a)
            b.reducers.append(pair.side_b)
            pairs.append(pair)
    return pairs


def _lockstep(runs: list[_ModelRun], loader: Iterable[list[Batch]], reducers_of: Callable[[_ModelRun], list[Reducer]],
              device: str, skips: SkipCounter | None, desc: str) -> int:
    seen = 0
    for views in tqdm(loader, desc=desc, unit="batch"):
        if skips is not None:
            skips.update(views[0])
        if len(views[0].images) == 0:
            continue
        for run in runs:
            run.image_hw = tuple(views[run.view].images.shape[-2:])
            run_reducers(run.capture, [views[run.view]], reducers_of(run), device=device, progress=None)
        seen += len(views[0].images)
    return seen


def _loader(dataset: Dataset, indices: np.ndarray, config: AnalysisConfig) -> DataLoader:
    return DataLoader(Subset(dataset, indices.tolist()), batch_size=config.batch_size, shuffle=False,
                      num_workers=config.num_workers, collate_fn=collate_views)


def _model_meta(run: _ModelRun, image_hw: tuple[int, int]) -> dict:
    facts = run.capture.facts
    grid = facts.grid_for(image_hw) if facts.kind == "vit" else None
    return {"spec": run.spec, "kind": facts.kind, "num_layers": facts.num_layers, "num_heads": facts.num_heads,
            "num_prefix_tokens": facts.num_prefix_tokens, "grid": list(grid) if grid else None,
            "patch_size": list(facts.patch_size), "num_tokens": grid[0] * grid[1] if grid else None,
            "input_size": list(image_hw), "has_class_token": facts.has_class_token,
            "parameters": sum(p.numel() for p in run.model.parameters())}


def analyze(models: Mapping[str, nn.Module | str], data: str, config: AnalysisConfig | None = None) -> AnalysisOutput:
    """Run every asked analysis on every model; return tidy results and arrays for figures.

    Args:
        models: label -> model spec (``timm:NAME``, ``mae:PATH``, ``bundled:NAME``, ...) or a module.
        data: a data spec (``fashion-mnist``, ``folder:DIR``, ...).
    """
    config = config or AnalysisConfig()
    wanted = config.wanted()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    runs = _prepare(models, config.device)
    views, view_of = _view_index([build_transform(run.model) for run in runs])
    for run, view in zip(runs, view_of):
        run.view = view
    transform = MultiView(views)
    test_set = open_dataset(data, "test", transform)
    train_set = open_dataset(data, "train", transform)
    same_source = not data.startswith("fashion-mnist")
    test_idx, train_idx = split_indices(test_set, train_set, same_source, config.num_images,
                                        config.probe_train_images, config.seed)
    _attach_reducers(runs, wanted, config)
    notes = [f"{run.label}: not a transformer; attention metrics skipped, token metrics and CKA computed"
             for run in runs if run.capture.facts.kind != "vit"]

    skips = SkipCounter()
    test_loader = _loader(test_set, test_idx, config)
    seen = _lockstep(runs, test_loader, lambda run: run.reducers, config.device, skips, "analyse")
    if seen == 0:
        raise ValueError(f"data {data!r}: no readable images ({skips.report()})")

    results = Results()
    arrays: dict[str, np.ndarray] = {}
    for run in runs:
        for reducer in run.reducers:
            results.extend(reducer.rows(run.label))
        if run.maps is not None:
            arrays.update(run.maps.arrays(run.label))
        if run.localisation is not None:
            arrays[f"{run.label}/localisation"] = run.localisation.maps()

    if "linear_probe" in wanted:
        _probe_and_noise(runs, train_set, train_idx, test_set, test_idx, wanted, config, results, skips)
    if "tsne" in wanted:
        arrays.update(_tsne(runs, test_set, test_idx, config))
    arrays.update(_example_image(runs, test_set, test_idx))

    results.meta = {
        "models": {run.label: _model_meta(run, run.image_hw) for run in runs},
        "data": data, "num_images": seen, "probe_train_images": int(len(train_idx)),
        "skipped": [list(item) for item in skips.skipped], "analyses": sorted(wanted),
        "config": asdict(config), "seed": config.seed, "notes": notes,
        "versions": {"vitscope": vitscope.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "python": platform.python_version()},
        "device": config.device,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    return AnalysisOutput(results, arrays)


def _probe_and_noise(runs: list[_ModelRun], train_set: Dataset, train_idx: np.ndarray, test_set: Dataset,
                     test_idx: np.ndarray, wanted: set[str], config: AnalysisConfig, results: Results,
                     skips: SkipCounter) -> None:
    for run in runs:
        run.train_bank = FeatureBank.for_capture(run.capture)
    train_loader = _loader(train_set, train_idx, config)
    _lockstep(runs, train_loader, lambda run: [run.train_bank], config.device, skips, "probe features")
    probe_config = ProbeConfig(epochs=config.probe_epochs, seed=config.seed, device=config.device)
    test_labels = dataset_labels(test_set)
    noise_idx = test_idx[stratified_subset(None if test_labels is None else test_labels[test_idx],
                                           config.noise_images, config.seed + 2, total=len(test_idx))]
    for run in runs:
        rows, probes = linear_probe(run.train_bank, run.test_bank, run.label, config=probe_config, progress=None)
        results.extend(rows)
        if "noise" not in wanted:
            continue
        kind = "cls" if run.capture.facts.has_class_token and "cls" in probes else "gap"
        classifier = probes[kind].classifier(run.model)
        batches = (views[run.view] for views in _loader(test_set, noise_idx, config))
        outcome = noise_robustness(classifier, batches, num_bands=config.noise_bands,
                                   relative_norm=config.noise_relative_norm, seed=config.seed,
                                   device=config.device, progress=f"noise {run.label}")
        results.extend(outcome.rows(run.label))


def _subset_views(dataset: Dataset, indices: np.ndarray) -> list[Batch]:
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=max(1, len(indices)), shuffle=False,
                        collate_fn=collate_views)
    return next(iter(loader))


def _tsne(runs: list[_ModelRun], test_set: Dataset, test_idx: np.ndarray, config: AnalysisConfig) -> dict[str, np.ndarray]:
    labels = dataset_labels(test_set)
    if labels is None or (labels[test_idx] < 0).all():
        return {}
    subset_labels = labels[test_idx]
    counts = np.unique(subset_labels[subset_labels >= 0], return_counts=True)[1]
    picked = test_idx[pick_examples(subset_labels, num_classes=min(config.tsne_classes, len(counts)),
                                    per_class=max(1, min(config.tsne_per_class, int(counts.min()))),
                                    seed=config.seed)]
    views = _subset_views(test_set, picked)
    arrays = {}
    for run in tqdm(runs, desc="t-SNE", unit="model"):
        images = views[run.view].images.to(config.device)
        depth = run.capture.facts.num_layers
        points = token_tsne(run.capture, images, views[run.view].labels, depth, seed=config.seed,
                            perplexity=min(30.0, (len(images) * _tokens_per_image(run, images) - 1) / 3))
        arrays[f"{run.label}/tsne_points"] = points["points"]
        arrays[f"{run.label}/tsne_labels"] = points["label"]
        arrays[f"{run.label}/tsne_image_ids"] = points["image_id"]
    return arrays


def _tokens_per_image(run: _ModelRun, images: Tensor) -> int:
    """Spatial tokens per image at the last depth (a CNN's last stage: its stride is the facts' patch size)."""
    h, w = run.capture.facts.grid_for(tuple(images.shape[-2:]))
    return h * w


def _example_image(runs: list[_ModelRun], test_set: Dataset, test_idx: np.ndarray) -> dict[str, np.ndarray]:
    """The first test image, de-normalised to [0, 1], for the attention-map figure."""
    if not runs:
        return {}
    views = _subset_views(test_set, test_idx[:1])
    image = views[runs[0].view].images[0]
    config = timm.data.resolve_data_config({}, model=runs[0].model)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return {"example_image": (image * std + mean).clamp(0, 1).numpy()}
