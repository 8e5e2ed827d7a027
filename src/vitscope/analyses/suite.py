"""The whole suite on several models: every analysis of docs/metrics.md from one pass per split.

:func:`analyze` walks the test images once with :func:`~vitscope.analyses.driver.run_lockstep`: each
batch is transformed for every model (its own timm data config), and each model's capture feeds all of
that model's reducers at once — the papers' metrics, CKA within the model and against every other
model, probe features, spatial localisation and the attention maps of a few query tokens. A second
pass over train images collects probe features. Then the per-layer linear probes are fitted, the
last-layer probe is scored under frequency-band noise, and the tokens of a few images are embedded
with t-SNE.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitscope.analyses.attention_maps import AttentionMaps
from vitscope.analyses.checkpoint import SuiteCheckpoint, array_digest, run_identity, weights_digest
from vitscope.analyses.cka import CKAReducer, CrossModelCKA
from vitscope.analyses.driver import ModelPass, run_lockstep
from vitscope.analyses.localisation import SpatialLocalisation
from vitscope.analyses.moments import ALL_METRICS, SPECTRUM_GROUPS, metric_reducers
from vitscope.analyses.noise import noise_robustness
from vitscope.analyses.preflight import ModelShape, RunPlan, check_control, plan_run, split_notes
from vitscope.analyses.probes import FeatureBank, LinearProbes, ProbeConfig, linear_probe
from vitscope.analyses.tokens import pick_examples, token_tsne
from vitscope.capture import make_capture
from vitscope.data import (
    Batch,
    ChoiceLoader,
    MultiView,
    SkipCounter,
    StratifiedChoice,
    build_transform,
    choice_loader,
    collate_views,
    dataset_labels,
    distinct_views,
    input_normalisation,
    open_dataset,
    split_choices,
    stratified_subset,
)
from vitscope.distributed import DistEnv, all_sum, current_env, gather_to_main
from vitscope.progress import progress_bar
from vitscope.results import Results
from vitscope.runmeta import RunMeta, model_meta, run_versions

__all__ = ["EXTRA_ANALYSES", "ALL_ANALYSES", "AnalysisConfig", "AnalysisOutput", "analyze"]

EXTRA_ANALYSES = ("linear_probe", "noise", "cka", "tsne", "attention_maps", "localisation")
ALL_ANALYSES = tuple(ALL_METRICS) + EXTRA_ANALYSES
PRECISIONS = ("fp32", "bf16", "fp16")
_COUNTS = (
    "num_images",
    "probe_train_images",
    "noise_images",
    "batch_size",
    "noise_bands",
    "probe_epochs",
    "tsne_classes",
    "tsne_per_class",
    "attention_images",
)


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
        num_workers: data loader worker processes; None: 0 on the CPU, up to 8 per process on a GPU (image
            decoding must keep up with it).
        attention_images: test images (the first ones) whose per-head attention maps are kept for the
            report's attention explorer (uint8 rows: images × blocks × heads × N² bytes per model).
        precision: ``fp32``, or ``bf16`` for a bfloat16 autocast forward pass (every metric is still
            accumulated in float32/float64; docs/metrics.md states the error it adds).
        spectrum_groups: groups of 2 consecutive test images whose spectra give ``singular_values`` and
            ``effective_rank`` (the first ones); None: every group.
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
    attention_images: int = 3
    num_workers: int | None = None
    precision: str = "fp32"
    spectrum_groups: int | None = SPECTRUM_GROUPS

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AnalysisConfig.{name} must be a positive integer, got {value!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"AnalysisConfig.num_workers must be ≥ 0, got {self.num_workers}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"AnalysisConfig.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not math.isfinite(self.noise_relative_norm) or self.noise_relative_norm < 0:
            raise ValueError(
                f"AnalysisConfig.noise_relative_norm must be a finite number ≥ 0, got {self.noise_relative_norm}"
            )
        if self.spectrum_groups is not None and (not isinstance(self.spectrum_groups, int) or self.spectrum_groups < 1):
            raise ValueError(
                f"AnalysisConfig.spectrum_groups must be a positive integer or None (every group), "
                f"got {self.spectrum_groups!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"AnalysisConfig.seed must be a non-negative integer, got {self.seed!r}")

    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def workers(self, env: DistEnv) -> int:
        if self.num_workers is not None:
            return self.num_workers
        if torch.device(self.device).type != "cuda":
            return 0
        return max(1, min(8, (os.cpu_count() or 1) // max(1, env.world) - 1))

    def wanted(self) -> set[str]:
        asked = set(ALL_ANALYSES if self.analyses is None else self.analyses)
        unknown = asked - set(ALL_ANALYSES)
        if unknown:
            raise ValueError(f"unknown analyses {sorted(unknown)}; choose from {', '.join(ALL_ANALYSES)}")
        return asked


@dataclass
class AnalysisOutput:
    """Tidy rows with the run's metadata, and the arrays the figures need (attention maps, t-SNE points,
    spatial-localisation maps, an example image)."""

    results: Results
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Model:
    """One model's part in the suite: its pass and the reducers whose output is not rows."""

    spec: str
    model: nn.Module
    run: ModelPass
    test_bank: FeatureBank | None = None
    train_bank: FeatureBank | None = None
    maps: AttentionMaps | None = None
    localisation: SpatialLocalisation | None = None

    @property
    def label(self) -> str:
        return self.run.label


def _load_models(models: Mapping[str, nn.Module | str], device: str) -> list[_Model]:
    from vitscope.models import load_model

    loaded = []
    for label, spec_or_model in models.items():
        if isinstance(spec_or_model, nn.Module):
            model, spec = spec_or_model, type(spec_or_model).__name__
        else:
            model, spec = load_model(spec_or_model), spec_or_model
        model = model.to(device).eval()
        loaded.append(_Model(spec, model, ModelPass(label, make_capture(model))))
    return loaded


def _attach_reducers(models: list[_Model], wanted: set[str], config: AnalysisConfig) -> None:
    for entry in models:
        facts, reducers = entry.run.capture.facts, entry.run.reducers
        asked = [m for m in ALL_METRICS if m in wanted]
        reducers.extend(metric_reducers(facts, asked, spectrum_groups=config.spectrum_groups))
        if "linear_probe" in wanted:
            entry.test_bank = FeatureBank()
            reducers.append(entry.test_bank)
        if "cka" in wanted:
            reducers.append(CKAReducer())
        if "attention_maps" in wanted and facts.kind == "vit":
            entry.maps = AttentionMaps(config.attention_images)
            reducers.append(entry.maps)
        if "localisation" in wanted and facts.kind == "vit":
            entry.localisation = SpatialLocalisation(depth=facts.num_layers)
            reducers.append(entry.localisation)
    if "cka" in wanted:
        for a, b in combinations(models, 2):
            pair = CrossModelCKA(a.label, b.label)
            a.run.reducers.append(pair.side_a)
            b.run.reducers.append(pair.side_b)


def _loader(
    dataset: Dataset, choice: StratifiedChoice, config: AnalysisConfig, env: DistEnv, shard: bool = True,
    start: int = 0,
) -> ChoiceLoader:  # fmt: skip
    """This process's batches of the chosen images (all of them when ``shard`` is False), from batch ``start``."""
    rank, world = (env.rank, env.world) if shard else (0, 1)
    return choice_loader(dataset, choice, batch_size=config.batch_size, num_workers=config.workers(env),
                         collate=collate_views, rank=rank, world=world,
                         pin_memory=torch.device(config.device).type == "cuda", start=start)  # fmt: skip


def _pass(
    name: str, passes: list[ModelPass], dataset: Dataset, choice: StratifiedChoice, config: AnalysisConfig,
    env: DistEnv, skips: SkipCounter, saved: SuiteCheckpoint, progress: str,
) -> int:  # fmt: skip
    """One lockstep pass over the chosen images, continued from the checkpoint and saved as it goes; returns
    the images this process saw (those of the batches restored included)."""
    where = saved.restore_pass(name, passes, config.device)
    skips.skipped.extend(where.skipped)
    start_seen = where.seen
    loader = _loader(dataset, choice, config, env, start=where.next_batch)
    total = loader.sampler.num_batches
    seen = run_lockstep(passes, loader, device=config.device, dtype=config.autocast_dtype(), skips=skips,
                        progress=progress if env.is_main else None,
                        after_batch=saved.after_batch(name, passes, where, skips, total))  # fmt: skip
    if not where.done:
        where.next_batch, where.seen, where.skipped, where.done = total, start_seen + seen, list(skips.skipped), True
        saved.save_pass(name, passes, where, total)
    return start_seen + seen


def _identity(
    models: list[_Model], data: str, config: AnalysisConfig, test: StratifiedChoice, train: StratifiedChoice
) -> dict:
    """What a resumed run must share with the checkpoint: settings, model weights and the chosen images."""
    identity = run_identity({entry.label: entry.spec for entry in models}, data, asdict(config))
    identity.update({f"weights.{entry.label}": weights_digest(entry.model) for entry in models})
    identity["images"] = array_digest(test.indices, train.indices)
    return identity


def _merge(runs: list[ModelPass], env: DistEnv) -> None:
    """Fold every process's reducers into rank 0's (one gather per reducer)."""
    if env.world == 1:
        return
    for run in runs:
        for reducer in run.reducers:
            states = gather_to_main(reducer.state(), env)
            if env.is_main:
                reducer.merge(states[1:])
        layouts = gather_to_main(run.layouts, env)
        if env.is_main:
            for other in layouts[1:]:
                run.layouts = run.layouts or other


def _merge_skips(skips: SkipCounter, env: DistEnv) -> None:
    for other in gather_to_main(skips.skipped, env)[1:]:
        skips.skipped.extend(other)


def _shapes(entries: list[_Model], views: Sequence[Callable], roles: Mapping[str, str]) -> dict[str, ModelShape]:
    """The architecture of the models in ``roles``: facts, and the token grid of the size each model's
    transform gives an image."""
    shapes = {}
    for entry in entries:
        if entry.label not in roles.values():
            continue
        facts = entry.run.capture.facts
        image = views[entry.run.view](Image.new("RGB", (256, 256)))
        grid = facts.grid_for((int(image.shape[-2]), int(image.shape[-1])))
        patch = (int(facts.patch_size[0]), int(facts.patch_size[1]))
        shapes[entry.label] = ModelShape(entry.label, facts.kind, facts.num_layers, facts.num_heads, grid, patch)
    return shapes


def _plan(data: str, test_set: Dataset, train_set: Dataset, wanted: set[str], config: AnalysisConfig) -> RunPlan:
    """The analyses and counts this data allows (:func:`~vitscope.analyses.preflight.plan_run`)."""
    return plan_run(
        wanted,
        config.analyses,
        data=data,
        num_test=config.num_images,
        num_train=config.probe_train_images,
        num_noise=config.noise_images,
        batch_size=config.batch_size,
        test_labels=dataset_labels(test_set),
        test_size=len(test_set),  # type: ignore[arg-type]  # every dataset open_dataset gives is Sized
        train_size=len(train_set),  # type: ignore[arg-type]
        same_source=not data.startswith("fashion-mnist"),
    )


def _model_note(entry: _Model) -> str:
    if entry.run.capture.facts.kind == "cnn":
        return f"{entry.label}: no attention (stages of a CNN or conv hybrid); token metrics, probes and CKA computed"
    return (f"{entry.label}: hierarchical, attention within windows; attention metrics are per window on the window's "
            "grid, spatial localisation and attention maps are not drawn")  # fmt: skip


def analyze(
    models: Mapping[str, nn.Module | str],
    data: str,
    config: AnalysisConfig | None = None,
    *,
    roles: Mapping[str, str] | None = None,
    notify: Callable[[str], None] | None = None,
    checkpoint: SuiteCheckpoint | None = None,
) -> AnalysisOutput | None:
    """Run every asked analysis on every model; return tidy results and arrays for figures.

    Before the pass (in seconds) the models load, a ``roles['control']`` must have the architecture of
    ``roles['cl']``, and :func:`~vitscope.analyses.preflight.plan_run` fits the analyses and counts to
    the data; each change from what was asked is a note, passed to ``notify`` at once (rank 0) and kept
    in ``meta['notes']``.

    Under ``torchrun`` (a process group set up, e.g. by :func:`vitscope.distributed.init_distributed`)
    every process analyses its share of the batches and rank 0 merges them, fits the probes, runs the
    noise experiment and t-SNE, and returns the output; the other processes return None.

    Args:
        models: label -> model spec (``timm:NAME``, ``mae:PATH``, ``bundled:NAME``, ...) or a module.
        data: a data spec (``fashion-mnist``, ``folder:DIR``, ...).
        config: what to run on how many images (default :class:`AnalysisConfig`).
        roles: role -> label (``cl``, ``mim``, ``control``, ``hybrid``); only the control check uses it.
        notify: called with each note made before the pass.
        checkpoint: where progress is saved as the run goes and restored from (``vitscope analyze --resume``;
            one process only); None keeps nothing.
    """
    config = config or AnalysisConfig()
    wanted = config.wanted()
    env = current_env()
    saved = checkpoint if checkpoint is not None and env.world == 1 else SuiteCheckpoint()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    entries = _load_models(models, config.device)
    views, view_of = distinct_views([build_transform(entry.model) for entry in entries])
    for entry, view in zip(entries, view_of):
        entry.run.view = view
    check_control(_shapes(entries, views, roles or {}), roles or {})
    transform = MultiView(views)
    test_set = open_dataset(data, "test", transform)
    train_set = open_dataset(data, "train", transform)
    plan = _plan(data, test_set, train_set, wanted, config)
    wanted = set(plan.wanted)
    test_choice, train_choice = split_choices(
        dataset_labels(test_set),
        len(test_set),
        dataset_labels(train_set),
        len(train_set),
        same_source=not data.startswith("fashion-mnist"),
        num_test=plan.num_test,
        num_train=plan.num_train,
        seed=config.seed,
    )
    notes = list(plan.notes)
    if not data.startswith("fashion-mnist"):
        notes += split_notes(dataset_labels(test_set), test_choice.indices, train_choice.indices,
                             getattr(test_set, "classes", ()))  # fmt: skip
    if notify is not None and env.is_main:
        for note in notes:
            notify(note)
    _attach_reducers(entries, wanted, config)
    notes += [_model_note(entry) for entry in entries if entry.run.capture.facts.kind != "vit"]
    if saved.enabled:
        saved.begin(_identity(entries, data, config, test_choice, train_choice))

    skips = SkipCounter()
    runs = [entry.run for entry in entries]
    pass_started = time.perf_counter()
    with saved.stage("test pass", defer_interrupts=True):
        seen = _pass("test", runs, test_set, test_choice, config, env, skips, saved, "analyse")
    seen = all_sum(seen, env)
    if seen == 0:
        raise ValueError(f"data {data!r}: no readable images ({skips.report()})")
    _merge(runs, env)
    pass_time = time.perf_counter() - pass_started
    train_banks = None
    if "linear_probe" in wanted:
        with saved.stage("probe features", defer_interrupts=True):
            train_banks = _probe_features(entries, train_set, train_choice, config, env, skips, saved)
    _merge_skips(skips, env)
    if not env.is_main:
        return None

    results = Results()
    arrays: dict[str, np.ndarray] = {}
    for entry in entries:
        for reducer in entry.run.reducers:
            results.extend(reducer.rows(entry.label))
        if entry.maps is not None:
            arrays.update(entry.maps.arrays(entry.label))
        if entry.localisation is not None and entry.localisation.grid is not None:
            arrays[f"{entry.label}/localisation"] = entry.localisation.maps()

    if train_banks is not None:
        _probe_and_noise(entries, train_banks, test_set, test_choice, wanted, config, results, plan.num_noise, saved)
    if "tsne" in wanted:
        with saved.stage("t-SNE"):
            tsne = _once(saved, "tsne", lambda: _tsne(entries, test_set, test_choice, config), "t-SNE: done")
        arrays.update({key: np.asarray(value) for key, value in tsne.items()})
        class_names = getattr(test_set, "classes", None) or ()
        if class_names:  # class index -> name, for the figures' legends
            arrays["class_names"] = np.array([str(name) for name in class_names])
    arrays.update(_example_images(entries, test_set, test_choice, config.attention_images))

    results.meta = RunMeta(
        models={entry.label: model_meta(entry.run, entry.model, spec=entry.spec, images=seen) for entry in entries},
        data=data,
        num_images=seen,
        probe_train_images=len(train_choice),
        noise_images=plan.num_noise,
        skipped=[list(item) for item in skips.skipped],
        analyses=sorted(wanted),
        config=asdict(config),
        seed=config.seed,
        notes=notes,
        versions=run_versions(),
        device=config.device,
        processes=env.world,
        pass_time_s=round(pass_time, 3),  # the lockstep pass over the test images, merge included
        wall_time_s=round(time.perf_counter() - started, 2),
    ).as_dict()
    return AnalysisOutput(results, arrays)


def _probe_features(
    entries: list[_Model], train_set: Dataset, train_choice: StratifiedChoice, config: AnalysisConfig, env: DistEnv,
    skips: SkipCounter, saved: SuiteCheckpoint,
) -> list[FeatureBank]:  # fmt: skip
    """Every model's probe features of the train images: one more lockstep pass, merged on rank 0."""
    banks = [FeatureBank() for _ in entries]
    passes = [ModelPass(e.label, e.run.capture, [bank], e.run.view) for e, bank in zip(entries, banks)]
    train_skips = SkipCounter()
    _pass("train", passes, train_set, train_choice, config, env, train_skips, saved, "probe features")
    skips.skipped.extend(train_skips.skipped)
    _merge(passes, env)
    return banks


def _once(saved: SuiteCheckpoint, name: str, compute: Callable[[], Any], note: str) -> Any:
    """``compute()``, or what an earlier attempt saved as ``name``; saved once computed."""
    payload = saved.load(name)
    if payload is None:
        payload = compute()
        saved.save(name, payload, note)
    else:
        saved.restored.append(name)
        saved.saved[name] = note
    return payload


def _probe_and_noise(
    entries: list[_Model],
    train_banks: list[FeatureBank],
    test_set: Dataset,
    test_choice: StratifiedChoice,
    wanted: set[str],
    config: AnalysisConfig,
    results: Results,
    num_noise: int,
    saved: SuiteCheckpoint,
) -> None:
    """Per-layer probes of every model (rank 0), and the last layer's probe under frequency-band noise
    (``num_noise`` test images)."""
    probe_config = ProbeConfig(epochs=config.probe_epochs, seed=config.seed, device=config.device)
    noise_choice = _noise_choice(test_set, test_choice, num_noise, config.seed)
    single = DistEnv(device=torch.device(config.device))  # the noise images are scored by rank 0 alone
    for index, (entry, train_bank) in enumerate(zip(entries, train_banks)):
        test_bank = entry.test_bank
        assert test_bank is not None

        def fit(bank: FeatureBank = train_bank, test: FeatureBank = test_bank, label: str = entry.label) -> dict:
            rows, probes = linear_probe(bank, test, label, config=probe_config, progress=None)
            return {"rows": rows, "probes": {kind: probe.to_plain() for kind, probe in probes.items()}}

        with saved.stage(f"probes ({entry.label})"):
            fitted = _once(saved, f"probes-{index}", fit, f"probes of {entry.label}: done")
        results.extend(fitted["rows"])
        if "noise" not in wanted:
            continue
        probes = {kind: LinearProbes.from_plain(probe, config.device) for kind, probe in fitted["probes"].items()}
        kind = "cls" if entry.run.capture.facts.has_class_token and "cls" in probes else "gap"
        classifier = probes[kind].classifier(entry.model)

        def score(entry: _Model = entry, classifier: nn.Module = classifier) -> list:
            batches = (views[entry.run.view] for views in _loader(test_set, noise_choice, config, single, shard=False))
            outcome = noise_robustness(
                classifier,
                batches,
                num_bands=config.noise_bands,
                relative_norm=config.noise_relative_norm,
                seed=config.seed,
                device=config.device,
                progress=f"noise {entry.label}",
            )
            return outcome.rows(entry.label)

        with saved.stage(f"noise ({entry.label})"):
            results.extend(_once(saved, f"noise-{index}", score, f"noise on {entry.label}: done"))


def _noise_choice(test_set: Dataset, test_choice: StratifiedChoice, num_noise: int, seed: int) -> StratifiedChoice:
    """A stratified subset of ``num_noise`` test images (seed + 2), with their replacement candidates."""
    labels = dataset_labels(test_set)
    positions = stratified_subset(
        None if labels is None else labels[test_choice.indices], num_noise, seed + 2, total=len(test_choice)
    )
    return test_choice.subset(positions)


def _load_all(dataset: Dataset, choice: StratifiedChoice) -> list[Batch]:
    """The chosen images as one batch per view."""
    loader = choice_loader(dataset, choice, batch_size=max(1, len(choice)), collate=collate_views)
    return next(iter(loader))


def _tsne(
    entries: list[_Model], test_set: Dataset, test_choice: StratifiedChoice, config: AnalysisConfig
) -> dict[str, np.ndarray]:
    labels = dataset_labels(test_set)
    if labels is None or (labels[test_choice.indices] < 0).all():
        return {}
    subset_labels = labels[test_choice.indices]
    counts = np.unique(subset_labels[subset_labels >= 0], return_counts=True)[1]
    picked = pick_examples(
        subset_labels,
        num_classes=min(config.tsne_classes, len(counts)),
        per_class=max(1, min(config.tsne_per_class, int(counts.min()))),
        seed=config.seed,
    )
    views = _load_all(test_set, test_choice.subset(picked))
    arrays = {}
    for entry in progress_bar(entries, desc="t-SNE", unit="model"):
        images = views[entry.run.view].images.to(config.device)
        h, w = entry.run.capture.facts.grid_for((int(images.shape[-2]), int(images.shape[-1])))
        points = token_tsne(
            entry.run.capture,
            images,
            views[entry.run.view].labels,
            entry.run.capture.facts.num_layers,
            seed=config.seed,
            perplexity=min(30.0, (len(images) * h * w - 1) / 3),
        )
        arrays[f"{entry.label}/tsne_points"] = points["points"]
        arrays[f"{entry.label}/tsne_labels"] = points["label"]
        arrays[f"{entry.label}/tsne_image_ids"] = points["image_id"]
    return arrays


def _example_images(
    entries: list[_Model], test_set: Dataset, test_choice: StratifiedChoice, count: int
) -> dict[str, np.ndarray]:
    """The first ``count`` readable test images (those the attention maps show), de-normalised:
    ``example_images`` uint8 [I, H, W, 3] and, for the static figures, ``example_image`` float [3, H, W] in [0, 1]."""
    if not entries:
        return {}
    images: list[Tensor] = []
    for start in range(0, len(test_choice), 16):
        views = _load_all(test_set, test_choice.subset(np.arange(start, min(start + 16, len(test_choice)))))
        images.extend(views[entries[0].run.view].images[: count - len(images)])
        if len(images) >= count:
            break
    if not images:
        return {}
    mean_values, std_values = input_normalisation(entries[0].model)
    mean = torch.tensor(mean_values).view(1, -1, 1, 1)
    std = torch.tensor(std_values).view(1, -1, 1, 1)
    pixels = (torch.stack(images) * std + mean).clamp(0, 1)
    rgb = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels[:, :3]
    return {
        "example_image": pixels[0].numpy(),
        "example_images": (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy(),
    }
