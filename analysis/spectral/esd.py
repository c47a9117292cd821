"""The per-head statistic shared by the analysis and the null calibration: the normalised ESD.

One code path turns factors into normalised eigenvalues, so that the Monte-Carlo null
(analysis/spectral/nulls.py) calibrates exactly the statistic that the analysis computes, estimator
noise included.
"""

from dataclasses import dataclass

import torch

from analysis.spectral.rmt import robust_mp_sigma2
from analysis.spectral.spectra import Factors, ProductSpectra, normalised_eigs, product_spectra


@dataclass
class HeadESD:
    """Normalised spectra of a batch of heads (N = L·H flattened).

    Attributes:
        eigs: (N, k) float64 λ_i = s_i²/(d² σ̂_A² σ̂_B²), descending (docs/methods.md §5).
        sigma2_left, sigma2_right: (N,) float64 robust per-entry variances σ̂_A², σ̂_B² of the
            factors, each from the factor's own spectrum s_i(A)²/d by `rmt.robust_mp_sigma2`
            (median matching, then a trimmed mean that drops eigenvalues above the 99% TW edge,
            so factor spikes do not inflate it).
        spectra: the raw singular values and top vectors.
        d, r: factor shape.
    """

    eigs: torch.Tensor
    sigma2_left: torch.Tensor
    sigma2_right: torch.Tensor
    spectra: ProductSpectra
    d: int
    r: int


def head_esd(left: Factors, right: Factors, dtype: torch.dtype = torch.float32, vectors: bool = True) -> HeadESD:
    """Normalised ESD of A_h B_hᵀ for left, right (N, d, r) with r ≤ d, or sequences of (n_i, d, r)
    chunks (see `spectra.product_spectra`); never raises on NaN/inf."""
    d, r = (left if isinstance(left, torch.Tensor) else left[0]).shape[-2:]
    return esd_from_spectra(product_spectra(left, right, dtype=dtype, vectors=vectors), d, r)


def esd_from_spectra(sp: ProductSpectra, d: int, r: int) -> HeadESD:
    """Fit σ̂_A², σ̂_B² to the factor spectra and normalise the product spectrum (see `HeadESD`)."""
    s2a = robust_mp_sigma2(sp.left_sv.double() ** 2 / d, d, r)
    s2b = robust_mp_sigma2(sp.right_sv.double() ** 2 / d, d, r)
    eigs = normalised_eigs(sp.sv, d, s2a, s2b)
    return HeadESD(eigs=eigs, sigma2_left=s2a, sigma2_right=s2b, spectra=sp, d=d, r=r)


def factor_lambda_max(esd: HeadESD) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised top eigenvalues s₁(A)²/(d σ̂_A²), s₁(B)²/(d σ̂_B²) of the factors (MP units, mean 1)."""
    d = esd.d
    la = esd.spectra.left_sv[..., 0].double() ** 2 / (d * esd.sigma2_left)
    lb = esd.spectra.right_sv[..., 0].double() ** 2 / (d * esd.sigma2_right)
    return la, lb
