"""When within-trajectory-normalised token credit degenerates: uniform, tied to a reference, or free.

Source: ARCA paper (arXiv 2606.00257), eq. "normalize" (with the authors' sharpening power), diagnostics
"Gini" and "effective-token ratio", Props. 1 and 2. Every bound below is our derivation; statements,
assumptions and proofs are in `theory/credit_degeneracy.md` (§N there). Numpy and sympy only: importable
without torch.

Notation:
    T: valid tokens of one trajectory; u = 1/T the uniform weight
    α_t ≥ 0: raw score of token t (the lab clamps scores ≥ 0 before normalising)
    ε: floor (ARCA paper: 1e-8); p > 0: sharpening power (1 = the paper's formula, 2 = the paper's runs)
    v_t = (α_t + ε)^p,  S = Σ_t v_t
    w_t = v_t / S, or w_t = u when S ≤ ε (uniform fallback)       ARCA paper eq. "normalize"
    ρ = max_t v_t / min_t v_t ≥ 1 (weight ratio); α ∈ [a, b] ⇒ ρ ≤ ((b + ε)/(a + ε))^p       (§1)
    G = Σ_i (2i − T − 1) w_(i) / (T Σ w), ascending sort;  ETR = (Σ w)² / (T Σ w²)      ARCA paper diagnostics
    two-level vector: k entries equal to ρ, T − k equal to 1 (the extremal configuration, §2)
    δ = max_t |α_t − α_t^ref|;  L = ‖W_lm‖_op;  β = max_t ‖Δh_t‖₂ (ARCA paper Props. 1–2)
    √2·Lβ: the proved bound on a log-prob shift (theory/aposteriori.md P4); the paper's 2Lβ is √2 looser
Shapes: scores (..., T) → per-trajectory values (...,); the bounds broadcast over ρ and T.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp
from numpy.typing import ArrayLike

EPS = 1e-8
"""The paper's floor ε (ARCA paper eq. "normalize")."""

LOGPROB_SHIFT_CONST = float(np.sqrt(2.0))
"""|Δ log π(y_t)| ≤ range(W_lm Δh_t) ≤ √2·L·‖Δh_t‖ (theory/aposteriori.md P4; √2 is best possible)."""

PAPER_PROP2_CONST = 2.0
"""The ARCA paper's Prop. 2 constant (α^div ≤ 2Lβ): valid but √2 loose (P4); kept only as the cited value."""

REGIMES = ("fallback-uniform", "near-uniform", "tied", "free")
"""Labels `predict_regime` returns, from most to least constrained."""


def _check_eps_p(eps: float, p: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (the paper uses 1e-8), got {eps}")
    if not p > 0:
        raise ValueError(f"p (sharpening) must be > 0 (1 = paper formula, 2 = paper runs), got {p}")


def _check_rho_T(rho: ArrayLike, T: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    rho = np.asarray(rho, dtype=float)
    T = np.asarray(T)
    if np.any(~(rho >= 1)):
        raise ValueError("rho (max/min weight ratio) must be >= 1 (np.inf allowed)")
    if not np.issubdtype(T.dtype, np.integer) or np.any(T < 1):
        raise ValueError("T (valid tokens) must be an integer >= 1")
    return rho, T


# ------------------------------------------------------------------ the normalisation and its diagnostics


def weights(scores: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """w_t = (α_t + ε)^p / Σ_k (α_k + ε)^p over the last axis, uniform 1/T when the sum is ≤ ε; α clamped ≥ 0.

    ARCA paper eq. "normalize" with the authors' sharpening power p (mirrors
    `arca_lab.credit.normalize_scores` on one fully valid row). (..., T) → (..., T).
    """
    _check_eps_p(eps, p)
    a = np.asarray(scores, dtype=float)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise ValueError("scores must have a last axis of T >= 1 tokens")
    v = (np.clip(a, 0.0, None) + eps) ** p  # (..., T)
    total = v.sum(axis=-1, keepdims=True)  # (..., 1)
    fallback = total <= eps
    return np.where(fallback, 1.0 / a.shape[-1], v / np.where(fallback, 1.0, total))


def gini(w: ArrayLike) -> np.ndarray:
    """G = Σ_i (2i − n − 1) w_(i) / (n Σ w) over the last axis (ARCA paper, "Gini"). (..., n) → (...)"""
    w = np.sort(np.asarray(w, dtype=float), axis=-1)
    n = w.shape[-1]
    coef = 2.0 * np.arange(1, n + 1) - n - 1  # (n,)
    return (coef * w).sum(axis=-1) / (n * w.sum(axis=-1))


def etr(w: ArrayLike) -> np.ndarray:
    """ETR = (Σ w)² / (n Σ w²) over the last axis (ARCA paper "effective-token ratio"). (..., n) → (...)"""
    w = np.asarray(w, dtype=float)
    return w.sum(axis=-1) ** 2 / (w.shape[-1] * (w**2).sum(axis=-1))


def weight_ratio(score_min: ArrayLike, score_max: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """ρ = ((b + ε)/(a + ε))^p ≥ max_t w_t / min_t w_t for scores α ∈ [a, b] (§1; inf when a = ε = 0)."""
    _check_eps_p(eps, p)
    a, b = np.asarray(score_min, dtype=float), np.asarray(score_max, dtype=float)
    if np.any(~(a >= 0)) or np.any(~(b >= a)):
        raise ValueError("need 0 <= score_min <= score_max (scores are clamped >= 0)")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.where(b == a, 1.0, ((b + eps) / (a + eps)) ** p)


# ------------------------------------------------------------------ two-level vectors (§2)


def two_level_gini(k: ArrayLike, rho: ArrayLike, T: ArrayLike) -> np.ndarray:
    """Gini of k entries ρ and T − k entries 1: k(T − k)(ρ − 1) / (T(kρ + T − k)) (§2; computed via 1/ρ)."""
    k, rho, T = (np.asarray(x, dtype=float) for x in (k, rho, T))
    r = 1.0 / rho  # r form keeps ρ = inf finite
    return k * (T - k) * (1.0 - r) / (T * (k + (T - k) * r))


def two_level_etr(k: ArrayLike, rho: ArrayLike, T: ArrayLike) -> np.ndarray:
    """ETR of k entries ρ and T − k entries 1: (kρ + T − k)² / (T(kρ² + T − k)) (§2, written with r = 1/ρ)."""
    k, rho, T = (np.asarray(x, dtype=float) for x in (k, rho, T))
    r = 1.0 / rho
    return (k + (T - k) * r) ** 2 / (T * (k + (T - k) * r**2))


def _extremal_k(x_star: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer neighbours of k* = T x*, clipped to [1, max(T − 1, 1)]: the objective is unimodal in k (§2)."""
    hi = np.maximum(T - 1, 1)
    k = T * x_star
    return np.clip(np.floor(k), 1, hi), np.clip(np.ceil(k), 1, hi)


def gini_interval(rho: ArrayLike, T: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Tight [min, max] of the Gini over all weight vectors with max/min ratio ≤ ρ and T tokens (§2).

    Min 0 (uniform is allowed); max at a two-level vector with k = ⌊T/(1+√ρ)⌋ or ⌈T/(1+√ρ)⌉ top entries.
    """
    rho, T = _check_rho_T(rho, T)
    sr = np.sqrt(1.0 / rho)
    k1, k2 = _extremal_k(sr / (1.0 + sr), T)  # x* = 1/(1 + √ρ)
    hi = np.maximum(two_level_gini(k1, rho, T), two_level_gini(k2, rho, T))
    return np.zeros_like(hi), hi


def etr_interval(rho: ArrayLike, T: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Tight [min, max] of the ETR over all weight vectors with max/min ratio ≤ ρ and T tokens (§2).

    Max 1 (uniform); min at a two-level vector with k = ⌊T/(1+ρ)⌋ or ⌈T/(1+ρ)⌉ top entries.
    """
    rho, T = _check_rho_T(rho, T)
    r = 1.0 / rho
    k1, k2 = _extremal_k(r / (1.0 + r), T)  # x* = 1/(1 + ρ)
    lo = np.minimum(two_level_etr(k1, rho, T), two_level_etr(k2, rho, T))
    return lo, np.ones_like(lo)


def l1_ratio_bound(rho: ArrayLike, T: ArrayLike) -> np.ndarray:
    """Tight max of ‖w − u‖₁ over weight vectors with max/min ratio ≤ ρ: twice the max Gini (§2)."""
    return 2.0 * gini_interval(rho, T)[1]


def max_weight_bound(rho: ArrayLike, T: ArrayLike) -> np.ndarray:
    """Tight max_t w_t ≤ ρ / (ρ + T − 1) for max/min ratio ≤ ρ (one entry ρ, the rest 1; §2)."""
    rho, T = _check_rho_T(rho, T)
    return 1.0 / (1.0 + (T - 1) / rho)


def gini_envelope(rho: ArrayLike) -> np.ndarray:
    """T-free bound G ≤ (√ρ − 1)/(√ρ + 1) (sup of the two-level Gini over real k/T; §2); ‖w − u‖₁ ≤ 2×."""
    sr = np.sqrt(1.0 / np.asarray(rho, dtype=float))
    return (1.0 - sr) / (1.0 + sr)


def etr_envelope(rho: ArrayLike) -> np.ndarray:
    """T-free bound ETR ≥ 4ρ/(1 + ρ)² (Kantorovich form; inf of the two-level ETR over real k/T; §2)."""
    r = 1.0 / np.asarray(rho, dtype=float)
    return 4.0 * r / (1.0 + r) ** 2


def min_ratio_for_gini(G: ArrayLike) -> np.ndarray:
    """Smallest ρ whose envelope allows Gini G: ρ = ((1 + G)/(1 − G))² (inverse of `gini_envelope`; §2)."""
    G = np.asarray(G, dtype=float)
    if np.any(~((G >= 0) & (G < 1))):
        raise ValueError("Gini must lie in [0, 1)")
    return ((1.0 + G) / (1.0 - G)) ** 2


def min_ratio_for_etr(E: ArrayLike) -> np.ndarray:
    """Smallest ρ whose envelope allows ETR E: ρ = ((1 + √(1 − E))/√E)² (inverse of `etr_envelope`; §2)."""
    E = np.asarray(E, dtype=float)
    if np.any(~((E > 0) & (E <= 1))):
        raise ValueError("ETR must lie in (0, 1]")
    return ((1.0 + np.sqrt(1.0 - E)) / np.sqrt(E)) ** 2


# ------------------------------------------------------------------ bounds from the sum S (§3)


def l1_to_uniform_bound(power_sum: ArrayLike, T: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """Tight max ‖w − u‖₁ over score vectors with Σ_t (α_t + ε)^p = S = `power_sum` (§3):

        2 (1 − 1/T)(1 − T ε^p / S)   if S > ε,    0 if S ≤ ε (uniform fallback).

    Near-uniform exactly when S is close to its floor T ε^p, i.e. scores of order ε/p or below.
    """
    _check_eps_p(eps, p)
    total, T = np.asarray(power_sum, dtype=float), np.asarray(T)
    if np.any(T < 1) or np.any(total < T * eps**p * (1 - 1e-12)):
        raise ValueError("need T >= 1 and power_sum >= T * eps**p (each (α + ε)^p is at least ε^p)")
    return np.where(total <= eps, 0.0, 2.0 * (1.0 - 1.0 / T) * (1.0 - T * eps**p / np.maximum(total, eps)))


# ------------------------------------------------------------------ ARCA paper Prop. 2 (§4)


def logprob_shift_bound(L: ArrayLike, beta: ArrayLike) -> np.ndarray:
    """|Δ log softmax(z)_y| ≤ range(Δz) ≤ √2·L·β when ‖Δh‖₂ ≤ β, z = W_lm h (theory/aposteriori.md P4, §4).

    range(W Δh) = max_ij (w_i − w_j)·Δh ≤ max_ij ‖Wᵀ(e_i − e_j)‖·β ≤ √2 L β; √2 is best possible (P4's
    worst case). The ARCA paper's Prop. 2 states 2Lβ (`prop2_stated`): valid, √2 looser.
    """
    return LOGPROB_SHIFT_CONST * np.asarray(L, dtype=float) * np.asarray(beta, dtype=float)


def prop2_stated(L: ArrayLike, beta: ArrayLike) -> np.ndarray:
    """The ARCA paper's Prop. 2 bound 0 ≤ α^div ≤ 2Lβ, as cited: √2 looser than `logprob_shift_bound`."""
    return PAPER_PROP2_CONST * np.asarray(L, dtype=float) * np.asarray(beta, dtype=float)


def prop2_l1_bound(L_beta: ArrayLike, T: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """‖w^div − u‖₁ for divergence scores 0 ≤ α ≤ √2·Lβ (ARCA paper Prop. 2 with the P4 constant), explicit (§4):

    0 if T (√2Lβ + ε)^p ≤ ε (every such vector falls back),  else l1_ratio_bound((1 + √2Lβ/ε)^p, T).
    """
    _check_eps_p(eps, p)
    b = logprob_shift_bound(1.0, L_beta)
    T = np.asarray(T)
    bound = l1_ratio_bound(weight_ratio(np.zeros_like(b), b, eps, p), T)
    return np.where(T * (b + eps) ** p <= eps, 0.0, bound)


def prop2_rate(L_beta: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """Explicit rate ‖w^div − u‖₁ ≤ ((1 + z)^p − 1)/2, z = √2·Lβ/ε (≥ `prop2_l1_bound`; ≈ pLβ/(√2 ε), §4)."""
    _check_eps_p(eps, p)
    return ((1.0 + logprob_shift_bound(1.0, L_beta) / eps) ** p - 1.0) / 2.0


# ------------------------------------------------------------------ ARCA paper Prop. 1 (§5)


def prop1_stated(L: ArrayLike, beta: ArrayLike, ref_score_sum: ArrayLike) -> np.ndarray:
    """The paper's stated bound 4Lβ / Σ_t α_t^ref (ARCA paper Prop. 1). It misses a factor T (§5)."""
    return 4.0 * np.asarray(L, dtype=float) * np.asarray(beta, dtype=float) / np.asarray(ref_score_sum)


def prop1_bound_p1(T: ArrayLike, delta: ArrayLike, ref_score_sum: ArrayLike, eps: float = EPS) -> np.ndarray:
    """Corrected Prop. 1, p = 1: ‖w − w^ref‖₁ ≤ min(2, 2Tδ / (Σ_t α_t^ref + Tε)) (§5); surprisal: δ ≤ √2·Lβ."""
    T = np.asarray(T, dtype=float)
    return np.minimum(2.0, 2.0 * T * np.asarray(delta, dtype=float) / (np.asarray(ref_score_sum) + T * eps))


def _deviation(ref: np.ndarray, delta: ArrayLike, eps: float, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Largest |(α + ε)^p − (α_ref + ε)^p| over |α − α_ref| ≤ δ, α ≥ 0, and the smallest reachable v."""
    v_ref = (ref + eps) ** p
    lowest = (np.maximum(ref - delta, 0.0) + eps) ** p
    return np.maximum((ref + delta + eps) ** p - v_ref, v_ref - lowest), lowest


def perturbation_l1_bound(
    scores: ArrayLike, ref_scores: ArrayLike, eps: float = EPS, p: float = 1.0
) -> np.ndarray:
    """Realised-form lemma (§5): ‖w − w^ref‖₁ ≤ 2‖v − v^ref‖₁ / max(S, S^ref) when neither row falls back;
    0 when both fall back; 2 (trivial) when exactly one does. (..., T) × (..., T) → (...)."""
    _check_eps_p(eps, p)
    v = (np.clip(np.asarray(scores, dtype=float), 0.0, None) + eps) ** p
    v_ref = (np.clip(np.asarray(ref_scores, dtype=float), 0.0, None) + eps) ** p
    tot, tot_ref = v.sum(axis=-1), v_ref.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only on fallback rows, replaced below
        bound = np.minimum(2.0, 2.0 * np.abs(v - v_ref).sum(axis=-1) / np.maximum(tot, tot_ref))
    falls, falls_ref = tot <= eps, tot_ref <= eps
    return np.where(falls & falls_ref, 0.0, np.where(falls | falls_ref, 2.0, bound))


def prop1_bound(ref_scores: ArrayLike, delta: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """Corrected Prop. 1, any p (§5): for every α ≥ 0 with max_t |α_t − α_t^ref| ≤ δ,

        ‖w(α) − w(α^ref)‖₁ ≤ min(2, 2 Σ_t D_t / S^ref),  D_t = max deviation of (α_t + ε)^p,

    valid when the smallest reachable sum exceeds ε (no fallback); 0 if even the largest sum is ≤ ε; else 2.
    (..., T) → (...). For p = 1, Σ D_t ≤ Tδ gives `prop1_bound_p1`.
    """
    _check_eps_p(eps, p)
    ref = np.clip(np.asarray(ref_scores, dtype=float), 0.0, None)  # (..., T)
    delta = np.asarray(delta, dtype=float)[..., None]
    if np.any(~(delta >= 0)):
        raise ValueError("delta must be >= 0")
    D, lowest = _deviation(ref, delta, eps, p)  # (..., T)
    S_ref = ((ref + eps) ** p).sum(axis=-1)
    S_max = ((ref + delta + eps) ** p).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only on fallback rows, replaced below
        bound = np.minimum(2.0, 2.0 * D.sum(axis=-1) / S_ref)
    return np.where(S_max <= eps, 0.0, np.where(lowest.sum(axis=-1) <= eps, 2.0, bound))


def prop1_sup(ref_scores: ArrayLike, delta: ArrayLike, eps: float = EPS, p: float = 1.0) -> np.ndarray:
    """Sharp form of Prop. 1 (§5): the exact sup of ‖w(α) − w(α^ref)‖₁ over max_t |α_t − α_t^ref| ≤ δ, α ≥ 0,

        2 max_{A ⊆ [T]} (U_A S^ref_{A^c} + S^ref_A L_{A^c}) / (S^ref (S^ref + U_A − L_{A^c})),

    U_t, L_t the largest up/down moves of (α_t + ε)^p, X_A = Σ_{t ∈ A} X_t. Enumerates the 2^T subsets, so
    T ≤ 16. Same fallback handling as `prop1_bound` (exact only when no reachable row falls back).
    """
    _check_eps_p(eps, p)
    ref = np.clip(np.asarray(ref_scores, dtype=float), 0.0, None)  # (..., T)
    T = ref.shape[-1]
    if not 1 <= T <= 16:
        raise ValueError(f"prop1_sup enumerates 2^T subsets: need 1 <= T <= 16, got T={T}; use prop1_bound")
    delta = np.asarray(delta, dtype=float)[..., None]
    if np.any(~(delta >= 0)):
        raise ValueError("delta must be >= 0")
    v = (ref + eps) ** p  # (..., T)
    U = (ref + delta + eps) ** p - v
    lowest = (np.maximum(ref - delta, 0.0) + eps) ** p
    Lo = v - lowest
    A = (np.arange(2**T)[:, None] >> np.arange(T)) & 1  # (2^T, T) membership of each subset
    S = v.sum(axis=-1, keepdims=True)  # (..., 1)
    S_A, U_A, L_Ac = v @ A.T, U @ A.T, Lo @ (1 - A).T  # (..., 2^T)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only on fallback rows, replaced below
        sup = 2.0 * ((U_A * (S - S_A) + S_A * L_Ac) / (S * (S + U_A - L_Ac))).max(axis=-1)
    S_max = ((ref + delta + eps) ** p).sum(axis=-1)
    return np.where(S_max <= eps, 0.0, np.where(lowest.sum(axis=-1) <= eps, 2.0, sup))


def _prop1_box_bound(a: float, b: float, T: int, delta: float, eps: float, p: float) -> float:
    """Prop. 1 bound uniform over reference scores in [a, b]: Σ D_t / Σ v_t ≤ max_t D_t / v_t (mediant), and
    D(α)/v(α) peaks at α = a or α = clip(δ, a, b) for every p > 0 (§5)."""
    if T * (b + delta + eps) ** p <= eps:
        return 0.0
    if T * (max(a - delta, 0.0) + eps) ** p <= eps:
        return 2.0
    cand = np.array([a, min(max(delta, a), b), b])
    D, _ = _deviation(cand, delta, eps, p)
    return float(min(2.0, 2.0 * np.max(D / (cand + eps) ** p)))


# ------------------------------------------------------------------ regime prediction (§6)


def predict_regime(
    score_min: float,
    score_max: float,
    T: int,
    eps: float = EPS,
    p: float = 1.0,
    *,
    delta: float | None = None,
    tol: float = 0.1,
) -> dict:
    """Predicted credit regime for trajectories of T tokens whose scores lie in [score_min, score_max] (§6).

    - "fallback-uniform": T (score_max + ε)^p ≤ ε, every such row falls back to exactly uniform weights;
    - "near-uniform": ‖w − u‖₁ ≤ tol guaranteed (ratio bound, §2);
    - "tied": (needs `delta`, the max score shift from a reference whose scores lie in the same range)
      ‖w − w^ref‖₁ ≤ tol guaranteed (corrected Prop. 1, §5);
    - "free": neither; the Gini / ETR intervals below are all the scores' range implies.

    Returns {"regime", "rho", "l1_to_uniform_max", "gini": (lo, hi), "etr": (lo, hi), "max_weight",
    "fallback_possible", "tied_l1_max" (None without delta)}.
    """
    if not (isinstance(T, int | np.integer) and T >= 1):
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    rho = float(weight_ratio(score_min, score_max, eps, p))
    if T * (score_max + eps) ** p <= eps:
        l1, g, e, mw, regime = 0.0, (0.0, 0.0), (1.0, 1.0), 1.0 / T, "fallback-uniform"
    else:
        l1 = float(l1_ratio_bound(rho, T))
        g = tuple(float(x) for x in gini_interval(rho, T))
        e = tuple(float(x) for x in etr_interval(rho, T))
        mw = float(max_weight_bound(rho, T))
        regime = "near-uniform" if l1 <= tol else "free"
    tied = None
    if delta is not None:
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        tied = _prop1_box_bound(float(score_min), float(score_max), T, float(delta), eps, p)
        if regime == "free" and tied <= tol:
            regime = "tied"
    return {
        "regime": regime,
        "rho": rho,
        "l1_to_uniform_max": l1,
        "gini": g,
        "etr": e,
        "max_weight": mw,
        "fallback_possible": bool(T * (score_min + eps) ** p <= eps),
        "tied_l1_max": tied,
    }


# ------------------------------------------------------------------ sympy closed forms


@lru_cache(maxsize=1)
def closed_forms() -> dict[str, sp.Expr]:
    """The closed forms above as sympy expressions.

    Positive symbols k, T, rho, S, eps, p, delta, a_sum (= Σ α^ref), L, beta, z (= √2·Lβ/ε); the *_x entries are
    fractions x = k/T. Tests derive them from the definitions and check `simplify(derived − expected) == 0`.
    """
    k, T, rho, S, eps, p, delta, a_sum, L, beta, z = sp.symbols(
        "k T rho S eps p delta a_sum L beta z", positive=True
    )
    g2 = k * (T - k) * (rho - 1) / (T * (k * rho + T - k))
    return {
        "gini_two_level": g2,
        "etr_two_level": (k * rho + T - k) ** 2 / (T * (k * rho**2 + T - k)),
        "l1_two_level": 2 * g2,
        "gini_argmax_x": 1 / (1 + sp.sqrt(rho)),
        "gini_envelope": (sp.sqrt(rho) - 1) / (sp.sqrt(rho) + 1),
        "etr_argmin_x": 1 / (1 + rho),
        "etr_envelope": 4 * rho / (1 + rho) ** 2,
        "max_weight": rho / (rho + T - 1),
        "l1_sum_form": 2 * (1 - 1 / T) * (1 - T * eps**p / S),
        "prop2_rate": ((1 + z) ** p - 1) / 2,
        "prop1_p1": 2 * T * delta / (a_sum + T * eps),
        "prop1_stated": 4 * L * beta / a_sum,
        "logprob_shift": sp.sqrt(2) * L * beta,  # aposteriori.md P4
        "prop2_stated": 2 * L * beta,  # the paper's constant, cited
    }
