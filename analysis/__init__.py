"""Pure math and post-hoc studies: spectra of the QK probe against random-matrix nulls.

No Lightning, Hydra or W&B here, and no import from trainer/ or callbacks/: torch and numpy only.
The callback's entry point is `SpectralAnalyzer.analyze(model.qk_factors())` (analysis/health.py); the pieces it is
built from are importable on their own:

    spectra     singular values of A Bᵀ from the factors, per-layer sums
    esd         the normalised per-head ESD shared by the analysis and the null calibration
    rmt         Marchenko-Pastur, MP ⊠ MP, BBP, robust σ² (docs/methods.md §2-5)
    tracy_widom TW₁ by Fredholm determinant, Johnstone's centring and scaling
    nulls       "mp", "product", "shuffle" null models and their Monte-Carlo calibration
    metrics     per-matrix metrics (stable rank, effective rank, α, KS, overlap, ...)
    multitest   Bonferroni and Benjamini-Hochberg over a grid of p-values
"""

from analysis.health import HeadSpectra, SpectralAnalyzer, SpectralReport
from analysis.multitest import benjamini_hochberg, bonferroni
from analysis.nulls import NULL_NAMES

__all__ = [
    "NULL_NAMES",
    "HeadSpectra",
    "SpectralAnalyzer",
    "SpectralReport",
    "benjamini_hochberg",
    "bonferroni",
]
