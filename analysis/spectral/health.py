"""One entry point for the spectral health callback: `SpectralAnalyzer.analyze(model.qk_factors())`.

Per check, for every kind ("content", and "rope" for MLA) and every head of every layer in one
batched call: the normalised ESD of A_h B_hᵀ (analysis/spectral/esd.py), the null decision
(analysis/spectral/nulls.py), the metrics (analysis/spectral/metrics.py), the factor spectra with their MP test,
and the spectrum of the per-layer sum Σ_h A_h B_hᵀ. Pure torch/numpy; results on CPU.
"""

import math
import time
from dataclasses import dataclass

import torch

from analysis.spectral import metrics
from analysis.spectral.calibration import Calibration, NullCalibrator
from analysis.spectral.esd import HeadESD, factor_lambda_max, head_esd
from analysis.spectral.nulls import NULL_NAMES, NULLS, NullInputs, NullResult, factor_test
from analysis.spectral.spectra import lapack_threads, layer_sum_spectrum
from models.probe import QKFactors

HEAD_METRICS = ("lambda_max", "edge", "sigma2", "num_spikes", "tw_z", "stable_rank", "eff_rank",
                "mp_softrank", "ks", "alpha", "overlap", "pvalue", "spectral_norm")  # the (L, H) fields a check logs


@dataclass
class HeadSpectra:
    """Spectral state of one kind ("content" or "rope") over all L layers and H heads.

    Units: eigs, lambda_max, edge and threshold are the normalised ESD λ_i = s_i²/(d² σ̂_A² σ̂_B²)
    of A_h B_hᵀ (s_i its singular values, σ̂² the spike-robust per-entry variances of the factors),
    whose Gaussian null has mean 1 and upper edge `rmt.product_edge(r/d)` (docs/methods.md §5).
    All (L, H) tensors are CPU float32 except num_spikes (int64) and finite (bool). Heads with
    non-finite factors have finite=False, NaN metrics and num_spikes 0; an all-zero head is
    finite with NaN metrics (nothing to normalise).

    Attributes:
        kind: "content" or "rope".
        eigs: (L, H, r) normalised ESD, descending.
        lambda_max: (L, H) top eigenvalue.
        edge: (L, H) bulk edge of the null (product: asymptotic MP_γ ⊠ MP_γ edge; mp: σ̂²(1+√γ)²;
            shuffle: the product edge moved by the shuffle shift).
        threshold: (L, H) λ_max threshold at fa_level (a spike iff lambda_max > threshold,
            equivalently pvalue < fa_level).
        sigma2: (L, H) product/shuffle: σ̂_A² σ̂_B²; mp: σ² of the MP law fitted to s²/d².
        pvalue: (L, H) p-value of λ_max under the null (TW₁ tail model; see analysis/spectral/nulls.py).
        num_spikes: (L, H) #{λ_i > threshold}.
        tw_z: (L, H) TW-standardised λ_max, (λ_max − center)/scale with the null's finite-size TW
            center and scale, so pvalue = 1 − F_TW₁(tw_z).
        stable_rank, eff_rank, mp_softrank, ks, alpha: (L, H), see analysis/spectral/metrics.py.
        overlap: (L, H) |⟨u_prev, u⟩|·|⟨v_prev, v⟩| with the previous report; NaN on the first.
        top_u, top_v: (L, H, d) top left/right singular vectors of A_h B_hᵀ (unit, sign arbitrary).
        finite: (L, H) the factors were finite.
        spectral_norm: (L, H) the raw top singular value s_1 of A_h B_hᵀ (not normalised; for
            tracking growth of the operator itself across checks).
        pvalue_mc: (L, H) exact Monte-Carlo p-value (1 + #{null ≥ obs})/(R + 1); NaN for "mp".
        null, fa_level: the null model and per-head false-alarm level used.
    """

    kind: str
    eigs: torch.Tensor
    lambda_max: torch.Tensor
    edge: torch.Tensor
    threshold: torch.Tensor
    sigma2: torch.Tensor
    pvalue: torch.Tensor
    num_spikes: torch.Tensor
    tw_z: torch.Tensor
    stable_rank: torch.Tensor
    eff_rank: torch.Tensor
    mp_softrank: torch.Tensor
    ks: torch.Tensor
    alpha: torch.Tensor
    overlap: torch.Tensor
    top_u: torch.Tensor
    top_v: torch.Tensor
    finite: torch.Tensor
    spectral_norm: torch.Tensor
    pvalue_mc: torch.Tensor | None = None
    null: str = "product"
    fa_level: float = 0.01


@dataclass
class SpectralReport:
    """Everything one check computed.

    Attributes:
        heads: "content", and "rope" if the model has a rotary part, -> HeadSpectra.
        factors: per kind, with prefix p = "" for content and "rope_" for rope:
            f"{p}q", f"{p}k": (L, H, r) singular values of A_h (query side) and B_h (key side);
            f"{p}q_sigma2": (L, H) robust MP variance σ̂² of the entries;
            f"{p}q_edge": (L, H) MP edge in singular-value units σ̂(√d + √r);
            f"{p}q_threshold": (L, H) top singular value threshold at fa_level, same units;
            f"{p}q_pvalue": (L, H) p-value of the top singular value; f"{p}q_spikes": (L, H) int64
            count above the threshold; the same for k. The MP null is exact for a single Gaussian
            factor, with aspect ratio γ = r/d.
        layer_sum: (L, min(d, H r)) singular values of Σ_h A_h B_hᵀ (content kind), descending;
            (L, 0) when disabled.
        seconds: wall time of the whole analyze() call.
        calibration_seconds: part of it spent simulating null calibrations (0 once cached).
    """

    heads: dict[str, HeadSpectra]
    factors: dict[str, torch.Tensor]
    layer_sum: torch.Tensor
    seconds: float
    calibration_seconds: float = 0.0
    null: str = "product"
    fa_level: float = 0.01


class SpectralAnalyzer:
    """Spectra of every head's W_Q^h W_K^hᵀ against a random-matrix null, as one call per check.

    Args:
        null: "product" (default; MP_γ ⊠ MP_γ, Monte-Carlo calibrated), "mp" (naive MP on the
            product, to show its false alarms), "shuffle" (product null refitted to element
            shuffles of the actual factors), or "rotation" (the factors' own spectra, random
            relative orientation: the one that stays at level for MLA's composed factors).
            See analysis/spectral/nulls.py and analysis/spectral/nulls.py.
        fa_level: per-head false-alarm level α of `threshold`/`num_spikes` (multiple testing over
            heads is left to analysis.spectral.multitest on `pvalue`).
        mc_draws: Monte-Carlo draws R per shape (d, r) for the product null. Default 2000: draws
            cost O(r³) each (Bartlett sampling), and R = 300 left the realised false-alarm rate of
            the fitted threshold at ±0.25% around 1%; 2000 brings that to about ±0.1%.
        seed: seed of the calibration draws and of the shuffles.
        cache_dir: directory of the `.npz` calibration cache (default ~/.cache/qkscope/nulls).
        dtype: precision of the factor conversion and of the stored vectors; decompositions run
            in float64 (analysis/spectral/spectra.py).
        calibration: "tw" (p-values from the TW₁ tail model of the draws) or "empirical" (exact
            Monte-Carlo test, p ≥ 1/(R + 1)).
        shuffle_replicas: permutations per head for the "shuffle" null.
        rotation_draws: Haar draws per head for the "rotation" null (analysis/spectral/nulls.py).
        layer_sum: compute the per-layer Σ_h A_h B_hᵀ spectrum; layer_sum_method: see
            `spectra.layer_sum_spectrum`.
        min_tail: minimum tail size of the power-law fit (alpha is NaN for r < min_tail).
        lapack_threads: CPU threads for the batched small decompositions (see
            `spectra.lapack_threads`; None leaves torch's setting alone).
        use_disk_cache: read/write calibrations under cache_dir.
    """

    def __init__(
        self,
        null: str = "product",
        fa_level: float = 0.01,
        mc_draws: int = 2000,
        seed: int = 0,
        cache_dir: str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        calibration: str = "tw",
        shuffle_replicas: int = 8,
        rotation_draws: int = 200,
        layer_sum: bool = True,
        layer_sum_method: str = "auto",
        min_tail: int = 8,
        lapack_threads: int | None = 1,
        use_disk_cache: bool = True,
    ) -> None:
        if null not in NULL_NAMES:
            raise ValueError(f"null={null!r} is invalid; allowed: {list(NULL_NAMES)}")
        if not 0.0 < fa_level < 1.0:
            raise ValueError(f"fa_level={fa_level} is invalid; allowed: 0 < fa_level < 1")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} is invalid; allowed: torch.float32, torch.float64")
        if calibration not in ("tw", "empirical"):
            raise ValueError(f"calibration={calibration!r} is invalid; allowed: 'tw', 'empirical'")
        if shuffle_replicas < 1:
            raise ValueError(f"shuffle_replicas={shuffle_replicas} is invalid; it must be >= 1")
        self.null, self.fa_level, self.dtype, self.seed = null, fa_level, dtype, seed
        self.calibration, self.shuffle_replicas = calibration, shuffle_replicas
        if rotation_draws < 10:
            raise ValueError(f"rotation_draws={rotation_draws} is invalid; it must be >= 10")
        self.rotation_draws = rotation_draws
        self.layer_sum, self.layer_sum_method, self.min_tail = layer_sum, layer_sum_method, min_tail
        self.lapack_threads = lapack_threads
        self.calibrator = NullCalibrator(mc_draws, seed, cache_dir, use_disk_cache)
        self._calibration_seconds = 0.0

    # ------------------------------------------------------------------ public API

    def analyze(
        self,
        layers: list[list[QKFactors]],
        previous: SpectralReport | None = None,
        *,
        layer_sum: bool | None = None,
    ) -> SpectralReport:
        """Spectra, null decisions and metrics of every head of every layer (see SpectralReport).

        layers: `GPT.qk_factors()`, per layer a list of QKFactors (content first, then optionally
        rope), equal shapes per kind across layers. previous: the last report, for `overlap`.
        layer_sum: override the constructor's choice for this call (the per-layer d×d spectrum is
        the O(L d³) part of a check: most of its time at GPT-2-small size).
        Raises ValueError only for malformed input (no layers, mismatched shapes); non-finite
        weights never raise (finite=False, NaN metrics).
        """
        t0 = time.perf_counter()
        self._calibration_seconds = 0.0
        by_kind = _by_kind(layers)
        heads: dict[str, HeadSpectra] = {}
        factors: dict[str, torch.Tensor] = {}
        want_sum = self.layer_sum if layer_sum is None else layer_sum
        sums = torch.empty(len(layers), 0)
        # one thread for the decompositions, the d×d layer sum included: see spectra.lapack_threads
        with torch.no_grad(), lapack_threads(self.lapack_threads):
            for kind, (lefts, rights) in by_kind.items():
                prev = previous.heads.get(kind) if previous is not None else None
                heads[kind], fac = self._analyze_kind(kind, lefts, rights, prev)
                factors.update(fac)
            if want_sum and "content" in by_kind:
                lefts, rights = by_kind["content"]
                finite = heads["content"].finite.all(-1)
                sums = layer_sum_spectrum(lefts, rights, self.dtype, self.layer_sum_method, finite)
                sums = sums.float().cpu()
        return SpectralReport(
            heads=heads,
            factors=factors,
            layer_sum=sums,
            seconds=time.perf_counter() - t0,
            calibration_seconds=self._calibration_seconds,
            null=self.null,
            fa_level=self.fa_level,
        )

    def calibrate(self, d: int, r: int) -> Calibration:
        """The Monte-Carlo calibration of shape (d, r), simulated now unless cached (warm-up hook)."""
        t0 = time.perf_counter()
        with lapack_threads(self.lapack_threads):
            cal = self.calibrator.get(d, r)
        self._calibration_seconds += time.perf_counter() - t0
        return cal

    def null_density(self, kind: str, d: int, r: int, grid: torch.Tensor) -> torch.Tensor | None:
        """Null density of the normalised ESD on `grid` (float64, grid's shape), for plot overlays.

        kind: a null name (NULL_NAMES) or a QK kind ("content", "rope"), which uses this
        analyzer's null. None for a null whose law is per head ("rotation": it depends on each
        head's factor spectra, so no one curve is its density).
        """
        density = NULLS[kind if kind in NULL_NAMES else self.null].density
        return None if density is None else density(grid, r / d)

    def null_lambda_max(self, d: int, r: int) -> torch.Tensor:
        """(R,) sorted Monte-Carlo draws of the normalised λ_max under the product null (for plots)."""
        return torch.from_numpy(self.calibrate(d, r).product.copy())

    # ------------------------------------------------------------------ internals

    def _null(
        self, esd: HeadESD, lefts: list[torch.Tensor], rights: list[torch.Tensor], cal: Calibration | None
    ) -> NullResult:
        inputs = NullInputs(self.fa_level, self.calibration, cal, lefts, rights, self.seed, self.dtype,
                            self.shuffle_replicas, self.rotation_draws)
        return NULLS[self.null].test(esd, inputs)

    def _analyze_kind(
        self, kind: str, lefts: list[torch.Tensor], rights: list[torch.Tensor], prev: HeadSpectra | None
    ) -> tuple[HeadSpectra, dict[str, torch.Tensor]]:
        L, (H, d, r) = len(lefts), lefts[0].shape
        esd = head_esd(lefts, rights, self.dtype, vectors=True)
        ok = esd.spectra.finite.cpu()
        eigs = esd.eigs.cpu()
        esd.eigs = eigs
        esd.sigma2_left, esd.sigma2_right = esd.sigma2_left.cpu(), esd.sigma2_right.cpu()
        cal = self.calibrate(d, r) if NULLS[self.null].monte_carlo else None
        res = self._null(esd, lefts, rights, cal)

        lam_max = metrics.lambda_max(eigs)
        alpha, _ = metrics.powerlaw_alpha(eigs, self.min_tail)
        nan = torch.tensor(math.nan, dtype=torch.float64)

        def grid(x: torch.Tensor) -> torch.Tensor:  # (N,) -> (L, H) float32, NaN where not finite
            return torch.where(ok, x.double(), nan).reshape(L, H).float()

        top_u = esd.spectra.top_u.cpu().float().reshape(L, H, d)
        top_v = esd.spectra.top_v.cpu().float().reshape(L, H, d)
        pu, pv = (prev.top_u, prev.top_v) if prev is not None else (None, None)
        heads = HeadSpectra(
            kind=kind,
            eigs=torch.where(ok[:, None], eigs, nan).reshape(L, H, r).float(),
            lambda_max=grid(lam_max),
            edge=grid(res.edge),
            threshold=grid(res.threshold),
            sigma2=grid(res.sigma2),
            pvalue=grid(res.pvalue),
            num_spikes=torch.where(ok, metrics.num_spikes(eigs, res.threshold), 0).reshape(L, H),
            tw_z=grid(res.tw_z),
            stable_rank=grid(metrics.stable_rank(eigs)),
            eff_rank=grid(metrics.effective_rank(eigs)),
            mp_softrank=grid(metrics.mp_softrank(res.edge, lam_max)),
            ks=grid(metrics.ks_distance(eigs, res.null_cdf)),
            alpha=grid(alpha),
            overlap=metrics.vector_overlap(pu, pv, top_u, top_v),
            top_u=top_u,
            top_v=top_v,
            finite=ok.reshape(L, H),
            spectral_norm=grid(esd.spectra.sv[:, 0].cpu()),
            pvalue_mc=grid(res.pvalue_mc),
            null=self.null,
            fa_level=self.fa_level,
        )
        return heads, self._factor_entries(kind, esd, cal, ok, (L, H))

    def _factor_entries(
        self, kind: str, esd: HeadESD, cal: Calibration | None, ok: torch.Tensor, lh: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        d, r = esd.d, esd.r
        prefix = "" if kind == "content" else f"{kind}_"
        out: dict[str, torch.Tensor] = {}
        la, lb = factor_lambda_max(esd)
        for name, sv, s2, lam in (
            ("q", esd.spectra.left_sv, esd.sigma2_left, la),
            ("k", esd.spectra.right_sv, esd.sigma2_right, lb),
        ):
            sv, s2, lam = sv.cpu().double(), s2.cpu().double(), lam.cpu()
            p, thr = factor_test(lam, d, r, self.fa_level, cal)
            thr_sv = (d * s2 * thr).sqrt()
            spikes = (sv > thr_sv[:, None]).sum(-1)
            nan = torch.tensor(math.nan, dtype=torch.float64)
            out[f"{prefix}{name}"] = torch.where(ok[:, None], sv, nan).reshape(*lh, r).float()
            out[f"{prefix}{name}_sigma2"] = torch.where(ok, s2, nan).reshape(lh).float()
            edge = s2.sqrt() * (math.sqrt(d) + math.sqrt(r))
            out[f"{prefix}{name}_edge"] = torch.where(ok, edge, nan).reshape(lh).float()
            out[f"{prefix}{name}_threshold"] = torch.where(ok, thr_sv, nan).reshape(lh).float()
            out[f"{prefix}{name}_pvalue"] = torch.where(ok, p, nan).reshape(lh).float()
            out[f"{prefix}{name}_spikes"] = torch.where(ok, spikes, 0).reshape(lh)
        return out


def _by_kind(layers: list[list[QKFactors]]) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """{kind: ([left_l], [right_l])}, one detached (H, d, r) tensor per layer, kinds in the order of
    the first layer; checks that every layer has each kind once, with equal shapes."""
    if not layers:
        raise ValueError("analyze() needs at least one layer of QK factors")
    out = {}
    for kind in [f.kind for f in layers[0]]:
        lefts, rights = [], []
        for i, layer in enumerate(layers):
            match = [f for f in layer if f.kind == kind]
            if len(match) != 1:
                raise ValueError(f"layer {i} has {len(match)} QKFactors of kind {kind!r}; expected 1")
            f = match[0]
            if lefts and f.left.shape != lefts[0].shape:
                raise ValueError(
                    f"layer {i} kind {kind!r} has shape {tuple(f.left.shape)}, layer 0 has {tuple(lefts[0].shape)}"
                )
            lefts.append(f.left.detach())
            rights.append(f.right.detach())
        out[kind] = (lefts, rights)
    return out
