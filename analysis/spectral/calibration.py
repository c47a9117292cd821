"""Monte-Carlo calibration of the product null, cached per shape in memory and on disk.

[I] Under Gaussian factors the statistic (analysis/spectral/esd.py) is pivotal: scaling A or B rescales
σ̂_A² or σ̂_B² by the same factor, so its law depends on (d, r) only, and simulating
unit-variance factors through the *same* code (analysis/spectra.core_spectra and the same
σ̂ estimator) calibrates it exactly, estimator noise included. Only the Grams AᵀA, BᵀB enter,
so draws use the Bartlett decomposition (Bartlett 1933; Anderson 2003, Thm 7.2.1): AᵀA = L Lᵀ,
L lower triangular with L_ii² ~ χ²_{d−i+1} and L_ij ~ N(0, 1) below the diagonal. A draw costs
O(r²) random numbers and O(r³) flops, not O(d r²).
"""

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from analysis.files import atomic_write
from analysis.spectral.esd import esd_from_spectra, factor_lambda_max
from analysis.spectral.spectra import ProductSpectra, core_spectra
from analysis.spectral.tail import TailFit

CACHE_VERSION = 1  # bump when the statistic or the sampler changes: old cache files are ignored
DEFAULT_CACHE_DIR = "~/.cache/qkscope/nulls"


@dataclass
class Calibration:
    """Monte-Carlo null of one shape: sorted draws of the normalised top eigenvalues.

    Attributes:
        product: (R,) sorted λ_max of the normalised ESD of A Bᵀ, A, B independent Gaussian (d, r).
        factor: (2R,) sorted top eigenvalue s₁²/(d σ̂²) of a single Gaussian factor (MP units).
        seconds: wall time of the simulation (0 when loaded from a cache).
    """

    d: int
    r: int
    draws: int
    seed: int
    product: np.ndarray
    factor: np.ndarray
    seconds: float = 0.0
    _fits: dict[str, TailFit] = field(default_factory=dict, repr=False)

    def fit(self, which: str = "product") -> TailFit:
        """The TW tail model of the "product" or "factor" draws."""
        if which not in self._fits:
            self._fits[which] = TailFit.from_draws(getattr(self, which))
        return self._fits[which]

    def mc_pvalue(self, lam: torch.Tensor, which: str = "product") -> torch.Tensor:
        """(1 + #{draws ≥ λ})/(R + 1), the exact Monte-Carlo p-value; NaN in, NaN out."""
        draws = torch.from_numpy(getattr(self, which))
        x = torch.as_tensor(lam, dtype=torch.float64)
        above = draws.numel() - torch.searchsorted(draws, x.contiguous(), right=False)
        p = (1.0 + above.double()) / (draws.numel() + 1.0)
        return torch.where(torch.isnan(x), x, p)

    def empirical_threshold(self, level: float, which: str = "product") -> float:
        """The order statistic t with {λ > t} ⟺ {mc_pvalue ≤ α}; inf when R is too small for α."""
        draws = getattr(self, which)
        c = math.floor(level * (len(draws) + 1) + 1e-9) - 1  # allowed number of draws ≥ λ
        return math.inf if c < 0 else float(draws[len(draws) - 1 - c])


_MEMORY: dict[tuple[int, int, int, int, int], Calibration] = {}


def bartlett_triangular(n: int, d: int, r: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, G) for n Gaussian (d, r) factors without drawing them: G = AᵀA = Rᵀ R, R = Lᵀ upper.

    Bartlett decomposition of the Wishart W_r(d, I): L_ii² ~ χ²_{d−i+1}, L_ij ~ N(0, 1) (i > j).
    """
    df = d - np.arange(r)  # χ² degrees of freedom of the diagonal, i = 1..r
    L = np.tril(rng.standard_normal((n, r, r)), k=-1)
    L[:, np.arange(r), np.arange(r)] = np.sqrt(rng.chisquare(df, size=(n, r)))
    Lt = torch.from_numpy(L)
    return Lt.mT.contiguous(), Lt @ Lt.mT


def simulate_null(d: int, r: int, draws: int, seed: int, chunk: int = 256) -> Calibration:
    """Draw the product and factor null statistics for shape (d, r) (see the module doc)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, d, r, draws, CACHE_VERSION])
    prod, fac = [], []
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        RA, GA = bartlett_triangular(n, d, r, rng)
        RB, GB = bartlett_triangular(n, d, r, rng)
        S, sa, sb, _, _ = core_spectra(RA, RB, GA, GB, vectors=False)
        ok = torch.ones(n, dtype=torch.bool)
        sp = ProductSpectra(sv=S, left_sv=sa, right_sv=sb, top_u=None, top_v=None, finite=ok)
        esd = esd_from_spectra(sp, d, r)
        prod.append(esd.eigs[:, 0])
        la, lb = factor_lambda_max(esd)
        fac += [la, lb]
    return Calibration(
        d=d,
        r=r,
        draws=draws,
        seed=seed,
        product=np.sort(torch.cat(prod).numpy()),
        factor=np.sort(torch.cat(fac).numpy()),
        seconds=time.perf_counter() - t0,
    )


class NullCalibrator:
    """Monte-Carlo calibrations cached per (d, r, R, seed) in memory (process-wide) and on disk.

    Disk cache: one `.npz` per key under `cache_dir` (default ~/.cache/qkscope/nulls), written
    atomically; unreadable or stale files are recomputed, unwritable directories only warn.
    """

    def __init__(self, draws: int = 300, seed: int = 0, cache_dir: str | None = None, use_disk: bool = True) -> None:
        if draws < 10:
            raise ValueError(f"mc_draws={draws} is too small; use at least 10 (default 300)")
        self.draws, self.seed, self.use_disk = draws, seed, use_disk
        self.cache_dir = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))

    def path(self, d: int, r: int) -> Path:
        return self.cache_dir / f"product_v{CACHE_VERSION}_d{d}_r{r}_R{self.draws}_seed{self.seed}.npz"

    def get(self, d: int, r: int) -> Calibration:
        key = (d, r, self.draws, self.seed, CACHE_VERSION)
        if key in _MEMORY:
            return _MEMORY[key]
        cal = self._load(d, r) if self.use_disk else None
        if cal is None:
            cal = simulate_null(d, r, self.draws, self.seed)
            if self.use_disk:
                self._save(cal)
        _MEMORY[key] = cal
        return cal

    def _load(self, d: int, r: int) -> Calibration | None:
        path = self.path(d, r)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                if int(z["version"]) != CACHE_VERSION or len(z["product"]) != self.draws:
                    return None
                return Calibration(d, r, self.draws, self.seed, z["product"].copy(), z["factor"].copy())
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(f"ignoring unreadable null cache {path}: {err}", stacklevel=3)
            return None

    def _save(self, cal: Calibration) -> None:
        path = self.path(cal.d, cal.r)
        try:
            with atomic_write(path, "wb") as f:
                np.savez(f, product=cal.product, factor=cal.factor, version=CACHE_VERSION)
        except OSError as err:
            warnings.warn(f"could not write null cache {path}: {err}", stacklevel=3)
