"""Linear probes of every depth at once: cached CLS/GAP features, standardised, one linear map per layer.

Steps:
1. :class:`FeatureBank` (a Reducer, so it rides along the shared forward pass) keeps per depth the
   CLS token (models with a class token) and the mean of the spatial tokens (GAP) of every image:
   C float32 values per image, layer and kind, on the CPU.
2. :func:`fit_linear_probes` standardises each layer's features with the train split's mean and
   standard deviation (BatchNorm without affine, as MAE's probe) and trains L linear classifiers
   together: features stacked as [L, n, C], weights [L, C, K], logits by one batched matmul,
   cross-entropy summed over layers (each layer's gradient depends only on its own map, and AdamW
   is per parameter, so training them together equals training them one by one).
3. :meth:`LinearProbes.top1` scores every layer on the test split; :func:`linear_probe` does 2–3
   for every feature kind and gives tidy rows (metric ``linear_probe_top1``, in percent).
4. :meth:`LinearProbes.classifier` wraps one layer's probe and the model as ``images -> logits``
   (for the frequency-noise experiment, :mod:`vitscope.analyses.noise`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscope.analyses.features import pooled_features
from vitscope.analyses.reducer import Reducer
from vitscope.capture import Capture, LayerOutput, make_capture
from vitscope.progress import progress_bar
from vitscope.results import Row, make_row
from vitscope.runtime import single_threaded

__all__ = [
    "FeatureBank",
    "ProbeConfig",
    "LinearProbes",
    "ProbeClassifier",
    "fit_linear_probes",
    "linear_probe",
    "probe_rows",
]

PROBE_KINDS = ("cls", "gap")


# ---------------------------------------------------------------------------------- extraction
class FeatureBank(Reducer):
    """Per-depth CLS and GAP features of every image seen, float32, in run-wide batch order.

    CLS features are kept for models with a class token (:attr:`LayerOutput.has_class_token`; register
    tokens alone are not one), GAP features for every model. Features stay on the model's device and
    move to the CPU every ``offload_every`` batches, so a GPU run does not wait for a copy per batch.
    Under torchrun the processes' banks merge in batch order: the features are those of one process
    that saw every batch.
    """

    offload_every = 32

    def __init__(self) -> None:
        self.depths: list[int] = []
        self._batches: list[_BankBatch] = []
        self._current: _BankBatch | None = None

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self._current = _BankBatch(self.batch_index, labels.detach().to(torch.long), {})

    def update(self, layer: LayerOutput) -> None:
        assert self._current is not None, "FeatureBank.update before begin_batch"
        for kind in PROBE_KINDS:
            if kind == "gap" or layer.has_class_token:
                # a copy: the CLS token is a view that would keep the whole [B, N, C] layer alive (and saved)
                feats = pooled_features(layer, kind).detach().to(torch.float32, copy=True)
                self._current.features[(kind, layer.depth)] = feats

    def end_batch(self) -> None:
        current, self._current = self._current, None
        assert current is not None
        depths = sorted({depth for _, depth in current.features})
        if not self.depths:
            self.depths = depths
        elif depths != self.depths:
            raise RuntimeError(f"FeatureBank: depths changed between batches: {self.depths} -> {depths}")
        self._batches.append(current)
        if len(self._batches) % self.offload_every == 0:
            self._offload()

    def _offload(self) -> None:
        for batch in self._batches:
            batch.to_cpu()

    def _ordered(self) -> list[_BankBatch]:
        self._offload()
        return sorted(self._batches, key=lambda batch: batch.index)

    def state(self) -> dict:
        return {"depths": self.depths, "batches": [batch.plain() for batch in self._ordered()]}

    def merge(self, states: list[dict]) -> None:
        for state in states:
            self._batches.extend(_BankBatch.from_plain(batch) for batch in state["batches"])
            self.depths = self.depths or state["depths"]

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def batches_since(self, count: int) -> list[dict]:
        """The batches added after the first ``count`` (in the order they came), as plain CPU records."""
        return [batch.plain() for batch in self._batches[count:]]

    @property
    def kinds(self) -> list[str]:
        """Feature kinds held: ``cls`` (when the model has a class token) and ``gap``."""
        held = {kind for batch in self._batches for kind, _ in batch.features}
        return [kind for kind in PROBE_KINDS if kind in held]

    @property
    def labels(self) -> Tensor:
        batches = self._ordered()
        return torch.cat([b.labels for b in batches]) if batches else torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(sum(len(batch.labels) for batch in self._batches))

    def features(self, kind: str = "gap") -> Tensor:
        """[L, n, C] float32 over ``self.depths``. Layers of different width (CNN stages) are zero-padded
        to the widest; padded columns standardise to 0 and never move a probe."""
        if kind not in self.kinds:
            raise KeyError(f"FeatureBank holds {self.kinds} features, not {kind!r}")
        batches = self._ordered()
        per_depth = [torch.cat([b.features[(kind, depth)] for b in batches]) for depth in self.depths]
        width = max(f.shape[1] for f in per_depth)
        return torch.stack([F.pad(f, (0, width - f.shape[1])) for f in per_depth])

    def widths(self, kind: str = "gap") -> list[int]:
        """True feature width of each depth (before padding)."""
        first = self._batches[0]
        return [int(first.features[(kind, depth)].shape[1]) for depth in self.depths]


@dataclass
class _BankBatch:
    """One batch's labels and features by (kind, depth)."""

    index: int
    labels: Tensor
    features: dict[tuple[str, int], Tensor]

    def to_cpu(self) -> None:
        self.labels = self.labels.cpu()
        self.features = {key: value.cpu() for key, value in self.features.items()}

    def plain(self) -> dict:
        """As plain containers and CPU tensors (``torch.load(weights_only=True)`` reads them back)."""
        features = {key: value.cpu() for key, value in self.features.items()}
        return {"index": self.index, "labels": self.labels.cpu(), "features": features}

    @classmethod
    def from_plain(cls, record: dict) -> _BankBatch:
        return cls(int(record["index"]), record["labels"], dict(record["features"]))


# ------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class ProbeConfig:
    """Training of the linear probes. ``batch_size=None`` is full-batch."""

    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int | None = 256
    seed: int = 0
    device: str = "cpu"
    eps: float = 1e-6  # BatchNorm epsilon

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1 or None, got {self.batch_size}")


@dataclass
class LinearProbes:
    """L trained linear probes: standardisation (mean, std [L, C]) then weight [L, C, K], bias [L, K]."""

    depths: list[int]
    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    kind: str = "gap"
    widths: list[int] | None = None  # true width per layer when features were zero-padded
    train_top1: Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[-1])

    def to_plain(self) -> dict:
        """As plain containers and CPU tensors (``torch.load(weights_only=True)`` reads them back)."""
        tensors = {name: getattr(self, name).detach().cpu() for name in ("mean", "std", "weight", "bias", "train_top1")}
        return {"depths": list(self.depths), "kind": self.kind, "widths": self.widths, **tensors}

    @classmethod
    def from_plain(cls, record: dict, device: str | torch.device = "cpu") -> LinearProbes:
        tensors = {name: record[name].to(device) for name in ("mean", "std", "weight", "bias")}
        widths = None if record["widths"] is None else list(record["widths"])
        return cls(list(record["depths"]), **tensors, kind=record["kind"], widths=widths,
                   train_top1=record["train_top1"])  # fmt: skip

    def logits(self, feats: Tensor) -> Tensor:
        """feats [L, n, C] -> logits [L, n, K]."""
        feats = feats.to(self.weight.device, torch.float32)
        return torch.baddbmm(
            self.bias.unsqueeze(1), (feats - self.mean.unsqueeze(1)) / self.std.unsqueeze(1), self.weight
        )

    @torch.no_grad()
    def top1(self, feats: Tensor, labels: Tensor) -> Tensor:
        """Top-1 accuracy in percent per layer, [L] (CPU)."""
        if feats.shape[1] != labels.shape[0]:
            raise ValueError(f"{feats.shape[1]} feature rows but {labels.shape[0]} labels")
        pred = self.logits(feats).argmax(dim=-1)
        return (pred == labels.to(pred.device)).float().mean(dim=1).mul(100).cpu()

    def classifier(self, model_or_capture: nn.Module | Capture, depth: int | None = None) -> ProbeClassifier:
        """One layer's probe (default: the deepest) on top of the model, as ``images -> logits``."""
        depth = self.depths[-1] if depth is None else depth
        if depth not in self.depths:
            raise ValueError(f"no probe for depth {depth}; probes exist for depths {self.depths}")
        i = self.depths.index(depth)
        width = self.widths[i] if self.widths else int(self.weight.shape[1])
        capture = (
            model_or_capture
            if isinstance(model_or_capture, Capture)
            else make_capture(model_or_capture, attention=False, branches=False)
        )
        return ProbeClassifier(
            capture, depth, self.kind, self.mean[i, :width], self.std[i, :width], self.weight[i, :width], self.bias[i]
        )


def _standardiser(train: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-layer, per-channel mean and std of [L, n, C] (biased variance, as BatchNorm)."""
    mean = train.mean(dim=1)
    std = torch.sqrt(train.var(dim=1, unbiased=False) + eps)
    return mean, std


def fit_linear_probes(
    train_feats: Tensor,
    train_labels: Tensor,
    *,
    num_classes: int | None = None,
    config: ProbeConfig = ProbeConfig(),
    depths: Sequence[int] | None = None,
    progress: str | None = None,
) -> LinearProbes:
    """Train one linear classifier per layer on [L, n, C] features, all layers at once.

    AdamW with a cosine learning-rate decay, cross-entropy; zero-initialised maps; minibatch order
    from ``config.seed`` (deterministic on a given device).
    """
    if train_feats.ndim != 3:
        raise ValueError(f"train_feats must be [L, n, C], got shape {tuple(train_feats.shape)}")
    labels = train_labels.to(torch.long)
    if train_feats.shape[1] != labels.shape[0]:
        raise ValueError(f"{train_feats.shape[1]} feature rows but {labels.shape[0]} labels")
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("linear probes need labelled images (labels ≥ 0); the data has none or -1 labels")
    num_classes = num_classes or int(labels.max()) + 1
    device = torch.device(config.device)
    feats = train_feats.to(device, torch.float32)
    labels = labels.to(device)
    num_layers, n, width = feats.shape
    mean, std = _standardiser(feats, config.eps)
    x = (feats - mean.unsqueeze(1)) / std.unsqueeze(1)

    weight = torch.zeros(num_layers, width, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_layers, num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=config.lr, weight_decay=config.weight_decay)
    batch = n if config.batch_size is None else min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = config.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(config.seed)
    with single_threaded() if device.type == "cpu" else nullcontext():
        _train_probes(x, labels, weight, bias, optimizer, config, batch, total, generator, progress)
    probes = LinearProbes(
        list(depths) if depths is not None else list(range(num_layers)), mean, std, weight.detach(), bias.detach()
    )
    probes.train_top1 = probes.top1(feats, labels)
    return probes


def _train_probes(
    x: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor,
    optimizer: torch.optim.Optimizer,
    config: ProbeConfig,
    batch: int,
    total: int,
    generator: torch.Generator,
    progress: str | None,
) -> None:
    """Minibatch AdamW with cosine decay over ``total`` steps; all layers in one batched matmul."""
    num_layers, n, _ = x.shape
    num_classes = weight.shape[-1]
    device = x.device
    step = 0
    for _ in progress_bar(range(config.epochs), desc=progress, unit="epoch", enabled=progress is not None):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = torch.baddbmm(bias.unsqueeze(1), x[:, idx], weight)  # [L, b, K]
            target = labels[idx].repeat(num_layers)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target, reduction="sum") / len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


# ------------------------------------------------------------------------------------- reports
def probe_rows(model: str, kind: str, depths: Sequence[int], top1: Tensor, n: int) -> list[Row]:
    """Tidy rows: metric ``linear_probe_top1`` (percent), one per layer, column ``feature``."""
    return [
        make_row(model, "linear_probe_top1", depth, float(acc), n=n, feature=kind)
        for depth, acc in zip(depths, top1.tolist())
    ]


def linear_probe(
    train: FeatureBank,
    test: FeatureBank,
    model: str,
    *,
    config: ProbeConfig = ProbeConfig(),
    progress: str | None = "probe",
) -> tuple[list[Row], dict[str, LinearProbes]]:
    """Train probes of every depth and kind on ``train``, score them on ``test``.

    Returns the rows and the trained probes per kind (``probes['gap'].classifier(model)`` gives the
    last layer's probe as an image classifier).
    """
    if train.depths != test.depths:
        raise ValueError(f"train and test features cover different depths: {train.depths} vs {test.depths}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"linear probe needs images in both splits (train {len(train)}, test {len(test)})")
    train_labels, test_labels = train.labels, test.labels
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    rows: list[Row] = []
    probes: dict[str, LinearProbes] = {}
    for kind in train.kinds:
        fitted = fit_linear_probes(
            train.features(kind),
            train_labels,
            num_classes=num_classes,
            config=config,
            depths=train.depths,
            progress=None if progress is None else f"{progress} {kind}",
        )
        fitted.kind, fitted.widths = kind, train.widths(kind)
        rows += probe_rows(model, kind, train.depths, fitted.top1(test.features(kind), test_labels), len(test))
        probes[kind] = fitted
    return rows, probes


# ------------------------------------------------------------------------------------ classifier
class ProbeClassifier(nn.Module):
    """A model plus one layer's linear probe: images [B, 3, H, W] -> logits [B, K]."""

    mean: Tensor  # buffers, registered in __init__
    std: Tensor
    weight: Tensor
    bias: Tensor

    def __init__(
        self, capture: Capture, depth: int, kind: str, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor
    ) -> None:
        super().__init__()
        if kind not in PROBE_KINDS:
            raise ValueError(f"kind must be one of {PROBE_KINDS}, not {kind!r}")
        self.capture = capture
        self.depth = depth
        self.kind = kind
        for name, value in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias)):
            self.register_buffer(name, value.detach().clone())

    def features(self, images: Tensor) -> Tensor:
        found: list[Tensor] = []

        def grab(layer: LayerOutput) -> None:
            if layer.depth == self.depth:
                found.append(pooled_features(layer, self.kind).float())

        self.capture.run(images, grab)
        if not found:
            raise RuntimeError(f"the capture yielded no depth {self.depth}")
        return found[0]

    def forward(self, images: Tensor) -> Tensor:
        feats = self.features(images).to(self.weight.device)
        return ((feats - self.mean) / self.std) @ self.weight + self.bias
