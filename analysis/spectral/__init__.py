"""The spectral health check of every head's W_Q^h W_K^hᵀ, in the order a check runs:

    spectra     singular values of A Bᵀ from the probe's factors, per-layer sums
    esd         the normalised per-head ESD shared by the analysis and the null calibration
    rmt         Marchenko-Pastur, MP ⊠ MP, BBP, robust σ² (docs/methods.md §2-5)
    tracy_widom TW₁ by Fredholm determinant, Johnstone's centring and scaling
    tail        the TW₁ tail model fitted to Monte-Carlo draws
    calibration Monte-Carlo calibration of the Gaussian nulls per shape, cached on disk
    nulls       the null models behind one registry, `NULLS`: "mp", "product", "shuffle", "rotation"
    metrics     per-matrix metrics (stable rank, effective rank, α, KS, overlap, ...)
    multitest   Bonferroni and Benjamini-Hochberg over a grid of p-values
    health      `SpectralAnalyzer.analyze(model.qk_factors())`: one call per check -> SpectralReport
    plots       figures of a report
    history     the on-disk format of the checks (npz per check, logits.jsonl)
    logits      the QK logit bound from the probe's logit terms (docs/methods.md §9)
"""

from analysis.spectral.health import HeadSpectra, SpectralAnalyzer, SpectralReport
from analysis.spectral.multitest import benjamini_hochberg, bonferroni
from analysis.spectral.nulls import NULL_NAMES, NULLS

__all__ = [
    "NULLS",
    "NULL_NAMES",
    "HeadSpectra",
    "SpectralAnalyzer",
    "SpectralReport",
    "benjamini_hochberg",
    "bonferroni",
]
