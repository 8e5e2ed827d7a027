"""Streaming analyses: everything computed from the layers a capture yields, batch by batch.

- :mod:`.reducer` — the :class:`Reducer` protocol and running moments (mean ± standard error);
- :mod:`.driver` — the one lockstep driver: each model's capture runs once per batch and feeds all its
  reducers (:func:`run_lockstep`, :func:`run_reducers`);
- :mod:`.moments` — the papers' per-layer metrics as reducers (:func:`metric_reducers`,
  :func:`analyze_model`);
- :mod:`.cka` — minibatch CKA within a model and across models;
- :mod:`.probes` — per-layer linear probes; :mod:`.noise` — frequency-band noise robustness;
- :mod:`.tokens` — token t-SNE and SVD projection; :mod:`.localisation` — spatial localisation;
  :mod:`.attention_maps` — attention of a few queries to look at;
- :mod:`.suite` — all of them on several models at once (:func:`analyze`).
"""

from vitscope.analyses.attention_maps import AttentionMaps
from vitscope.analyses.cka import CKAAccumulator, CKAReducer, CrossModelCKA, cka_rows, cross_model_cka
from vitscope.analyses.driver import ModelPass, run_lockstep, run_reducers
from vitscope.analyses.features import FEATURE_KINDS, pooled_features
from vitscope.analyses.localisation import SpatialLocalisation, spatial_localisation
from vitscope.analyses.moments import ALL_METRICS, CURVE_METRICS, SCALAR_METRICS, analyze_model, metric_reducers
from vitscope.analyses.noise import NoiseResult, band_limited_noise, band_masks, noise_robustness
from vitscope.analyses.probes import FeatureBank, LinearProbes, ProbeConfig, fit_linear_probes, linear_probe
from vitscope.analyses.reducer import MomentsReducer, Reducer, RunningMoments
from vitscope.analyses.suite import ALL_ANALYSES, AnalysisConfig, AnalysisOutput, analyze
from vitscope.analyses.tokens import pick_examples, svd_projection, token_tsne

__all__ = [
    "Reducer",
    "RunningMoments",
    "MomentsReducer",
    "ModelPass",
    "run_lockstep",
    "run_reducers",
    "ALL_METRICS",
    "SCALAR_METRICS",
    "CURVE_METRICS",
    "metric_reducers",
    "analyze_model",
    "CKAAccumulator",
    "CKAReducer",
    "CrossModelCKA",
    "cka_rows",
    "cross_model_cka",
    "FEATURE_KINDS",
    "pooled_features",
    "FeatureBank",
    "LinearProbes",
    "ProbeConfig",
    "fit_linear_probes",
    "linear_probe",
    "NoiseResult",
    "band_masks",
    "band_limited_noise",
    "noise_robustness",
    "pick_examples",
    "token_tsne",
    "svd_projection",
    "SpatialLocalisation",
    "spatial_localisation",
    "AttentionMaps",
    "ALL_ANALYSES",
    "AnalysisConfig",
    "AnalysisOutput",
    "analyze",
]
