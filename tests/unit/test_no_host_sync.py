"""No reducer waits for the device inside the pass: after the first batch (which checks the model), no
`.item()`, `.tolist()`, `.cpu()`, `.numpy()` or Python conversion of a tensor runs per batch, in the
capture or in any reducer of the suite's pass (every metric, CKA, attention maps, localisation, probe
features). On a GPU each of those would stall the pipeline; this check needs no GPU: torch's function
mode sees every such call on any device."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
from torch import Tensor
from torch.overrides import TorchFunctionMode

from tests.support.runs import TINY_VIT, image_folder
from vitscope.analyses import AnalysisConfig, analyze
from vitscope.analyses import driver as driver_module

SYNCING = {Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__, Tensor.__float__}


class HostSyncSpy(TorchFunctionMode):
    """Records every tensor call that would copy a value to the host, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in SYNCING:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/vitscope/" in f.filename)
            self.calls.append(f"{func.__name__} at {frame.filename.split('/src/')[-1]}:{frame.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_host_sync_per_batch_after_the_first(tmp_path, monkeypatch, precision):
    spy = HostSyncSpy()
    run_one = driver_module._run_one
    batches: list[int] = []

    def watched(model, batch, position, device, dtype):
        batches.append(position[0])
        if position[0] == 0:  # the first batch checks the model (a few values read on purpose)
            return run_one(model, batch, position, device, dtype)
        with spy:
            return run_one(model, batch, position, device, dtype)

    monkeypatch.setattr(driver_module, "_run_one", watched)
    data = image_folder(tmp_path / "images", classes=2, per_class=8)
    config = AnalysisConfig(
        num_images=12, batch_size=4, probe_train_images=8, probe_epochs=1, noise_images=4, precision=precision,
        analyses=["attention_distance", "nmi", "attention_entropy", "token_cosine", "head_cosine", "depth_cosine",
                  "effective_rank", "singular_values", "fourier_high", "fourier_delta", "residual_ratio_attn",
                  "residual_ratio_mlp", "cka", "attention_maps", "localisation", "linear_probe"],
    )  # fmt: skip
    analyze({"a": TINY_VIT + "&seed=1", "b": TINY_VIT + "&seed=2"}, f"folder:{data}", config)
    assert len([b for b in batches if b > 0]) >= 4  # batches 1, 2 of the test pass for both models (and probe ones)
    assert spy.calls == []
