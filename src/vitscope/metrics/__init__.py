"""The papers' metrics as pure tensor functions: torch in, torch out, any float dtype, any device.

Definitions: docs/metrics.md. :mod:`.attention` (distance, NMI, entropy on spatial attention),
:mod:`.representation` (token / head / depth cosine, spectra, Fourier, residual ratio), :mod:`.cka`
(CKA of two feature sets). Streaming them over a data set is :mod:`vitscope.analyses`' job.
"""

from vitscope.metrics.attention import (
    attention_distance,
    attention_entropy,
    attention_nmi,
    distance_matrix,
    entropy_from_parts,
    image_chunks,
    key_marginal,
    mean_row_kl_to_uniform,
    nmi_from_parts,
    spatial_attention,
    spatial_attention_for_reduction,
)
from vitscope.metrics.cka import cka, gram_linear, gram_rbf, hsic1, linear_cka, rbf_cka, unbiased_centre
from vitscope.metrics.representation import (
    depth_cosine_similarity,
    effective_rank,
    fourier_delta_log_amplitude,
    fourier_log_amplitude_diagonal,
    head_cosine_similarity,
    residual_ratio,
    singular_values,
    token_cosine_similarity,
)

__all__ = [
    "attention_distance",
    "attention_nmi",
    "attention_entropy",
    "spatial_attention",
    "spatial_attention_for_reduction",
    "image_chunks",
    "distance_matrix",
    "mean_row_kl_to_uniform",
    "key_marginal",
    "entropy_from_parts",
    "nmi_from_parts",
    "token_cosine_similarity",
    "head_cosine_similarity",
    "depth_cosine_similarity",
    "singular_values",
    "effective_rank",
    "fourier_log_amplitude_diagonal",
    "fourier_delta_log_amplitude",
    "residual_ratio",
    "linear_cka",
    "rbf_cka",
    "cka",
    "gram_linear",
    "gram_rbf",
    "unbiased_centre",
    "hsic1",
]
