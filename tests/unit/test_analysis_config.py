"""AnalysisConfig rejects bad settings at construction, naming the field."""

from __future__ import annotations

import math

import pytest

from vitscope.analyses import AnalysisConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_images", 0, "AnalysisConfig.num_images must be a positive integer, got 0"),
        ("num_workers", -1, "AnalysisConfig.num_workers must be ≥ 0, got -1"),
        ("precision", "fp8", "AnalysisConfig.precision must be one of fp32, bf16, fp16, not 'fp8'"),
        ("noise_relative_norm", -0.5, "AnalysisConfig.noise_relative_norm must be a finite number ≥ 0, got -0.5"),
        ("noise_relative_norm", math.nan, "AnalysisConfig.noise_relative_norm must be a finite number ≥ 0, got nan"),
        ("noise_relative_norm", math.inf, "AnalysisConfig.noise_relative_norm must be a finite number ≥ 0, got inf"),
        ("seed", -1, "AnalysisConfig.seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AnalysisConfig(**{field: value})


def test_default_config_is_accepted() -> None:
    config = AnalysisConfig()
    assert config.noise_relative_norm >= 0 and config.precision == "fp32"
