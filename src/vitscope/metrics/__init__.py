"""The papers' metrics: pure tensor functions and their one-pass streaming reducers.

Functions (torch in, torch out; see :mod:`vitscope.metrics.functions`) compute a metric on one
batch; :func:`analyze_model` streams all of them over a data loader in one forward pass per batch
and returns tidy :class:`~vitscope.results.Results`; :func:`metric_reducers` gives the reducers
themselves, to share that pass with other reducers (probes, CKA).
"""
from vitscope.metrics.functions import (
    attention_distance,
    attention_entropy,
    attention_nmi,
    depth_cosine_similarity,
    distance_matrix,
    effective_rank,
    fourier_delta_log_amplitude,
    head_cosine_similarity,
    residual_ratio,
    singular_values,
    spatial_attention,
    token_cosine_similarity,
)
from vitscope.metrics.cka import CKAAccumulator, CKAReducer, CrossModelCKA, cka_rows, linear_cka, rbf_cka
from vitscope.metrics.reducers import ALL_METRICS, CURVE_METRICS, SCALAR_METRICS, analyze_model, metric_reducers

__all__ = [
    "attention_distance",
    "attention_nmi",
    "attention_entropy",
    "token_cosine_similarity",
    "head_cosine_similarity",
    "depth_cosine_similarity",
    "singular_values",
    "effective_rank",
    "fourier_delta_log_amplitude",
    "residual_ratio",
    "spatial_attention",
    "distance_matrix",
    "linear_cka",
    "rbf_cka",
    "CKAAccumulator",
    "CKAReducer",
    "CrossModelCKA",
    "cka_rows",
    "analyze_model",
    "metric_reducers",
    "ALL_METRICS",
    "SCALAR_METRICS",
    "CURVE_METRICS",
]
