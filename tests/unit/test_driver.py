"""The one lockstep driver: call order, views, skipped files, and that models see the same batches."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tests.support.models import tiny_vit
from vitscope.analyses import CrossModelCKA, ModelPass, Reducer, run_lockstep, run_reducers
from vitscope.analyses.cka import CKAAccumulator
from vitscope.analyses.features import pooled_features
from vitscope.capture import LayerOutput, make_capture
from vitscope.data import Batch, SkipCounter


class Recorder(Reducer):
    """Writes down every call it gets, and the images and depths it saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.images: list[Tensor] = []

    def begin_batch(self, images: Tensor, labels: Tensor) -> None:
        self.calls.append(f"begin {len(images)}")
        self.images.append(images.clone())

    def update(self, layer: LayerOutput) -> None:
        self.calls.append(f"depth {layer.depth}")

    def end_batch(self) -> None:
        self.calls.append("end")


def _batches(n: int, size: int = 32, views: int = 1) -> list[list[Batch]]:
    torch.manual_seed(0)
    out = []
    for start in range(0, n, 4):
        count = min(4, n - start)
        labels = torch.arange(start, start + count)
        out.append([Batch(torch.randn(count, 3, size, size) + v, labels) for v in range(views)])
    return out


def test_each_batch_runs_begin_every_depth_in_order_then_end():
    recorder = Recorder()
    seen = run_reducers(make_capture(tiny_vit(depth=2)), _batches(6), [recorder], progress=None)
    assert seen == 6
    assert recorder.calls == [
        "begin 4",
        "depth 0",
        "depth 1",
        "depth 2",
        "end",
        "begin 2",
        "depth 0",
        "depth 1",
        "depth 2",
        "end",
    ]


def test_models_read_their_own_view_of_the_same_images():
    a, b = Recorder(), Recorder()
    batches = _batches(8, views=2)
    models = [
        ModelPass("a", make_capture(tiny_vit(depth=1)), [a], view=0),
        ModelPass("b", make_capture(tiny_vit(depth=1)), [b], view=1),
    ]
    assert run_lockstep(models, batches, progress=None) == 8
    for k, views in enumerate(batches):
        assert torch.equal(a.images[k], views[0].images) and torch.equal(b.images[k], views[1].images)
    assert models[0].image_hw == models[1].image_hw == (32, 32)


def test_skipped_files_are_counted_and_empty_batches_run_no_model():
    recorder = Recorder()
    skips = SkipCounter()
    empty = Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [("x.png", "broken")])
    batches = [[empty], *_batches(4)]
    batches[1][0].skipped.append(("y.jpg", "truncated"))
    seen = run_lockstep(
        [ModelPass("m", make_capture(tiny_vit(depth=1)), [recorder])], batches, skips=skips, progress=None
    )
    assert seen == 4 and skips.count == 2 and recorder.calls[0] == "begin 4"


def test_loader_items_may_be_batches_pairs_or_tensors():
    recorder = Recorder()
    images = torch.randn(4, 3, 32, 32)
    items = [Batch(images, torch.zeros(4, dtype=torch.long)), (images, torch.zeros(4, dtype=torch.long)), images]
    assert run_reducers(make_capture(tiny_vit(depth=1)), items, [recorder], progress=None) == 12
    with pytest.raises(TypeError, match="expected Batch"):
        run_reducers(make_capture(tiny_vit(depth=1)), ["not a batch"], [recorder], progress=None)


def test_cross_model_cka_in_lockstep_equals_the_accumulator_fed_by_hand():
    vit_a, vit_b = tiny_vit(depth=2), tiny_vit(depth=3, embed_dim=48)
    pair = CrossModelCKA("a", "b")
    batches = _batches(12)
    models = [ModelPass("a", make_capture(vit_a), [pair.side_a]), ModelPass("b", make_capture(vit_b), [pair.side_b])]
    run_lockstep(models, batches, progress=None)
    by_hand = CKAAccumulator()
    for (batch,) in batches:
        feats = []
        for model in (vit_a, vit_b):
            kept: list[Tensor] = []
            make_capture(model).run(batch.images, lambda layer, kept=kept: kept.append(pooled_features(layer)))
            feats.append(kept)
        by_hand.update(feats[0], feats[1])
    torch.testing.assert_close(pair.matrix(), by_hand.matrix())
    assert pair.matrix().shape == (3, 4)
