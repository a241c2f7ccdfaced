"""Softmax KL lemma: exact log-sum-exp forms and range bounds (derivation: theory/softmax_kl.md).

Notation:
    a ∈ R^V      reference logits;  π_ref = p = softmax(a / τ)
    z ∈ R^V      logit shift;       π_θ   = q = softmax((a + z) / τ)
    τ > 0        temperature (TRL divides logits by τ, so the effective shift is z / τ)
    ρ            range of the effective shift, ρ = (max z − min z) / τ
    KL(π_ref‖π_θ) = KL(p‖q) = lse(a' + z') − lse(a') − pᵀz'              (a' = a/τ, z' = z/τ)   [L1]
    KL(π_θ‖π_ref) = KL(q‖p) = lse(a') − lse(a' + z') + qᵀz'                                       [L1']
    Both directions, any a:  KL ≤ K(ρ) ≤ ρ²/8 ≤ ‖z' − mean(z')‖₂²/4 ≤ ‖z'‖₂²/4                     [L3–L5]
    K(ρ) = log((e^ρ − 1)/ρ) − 1 + ρ/(e^ρ − 1) is the exact supremum of either KL over a given range ρ.
    |log q_y − log p_y| ≤ ρ for every y                                                            [L6]

The sympy expressions are the objects the derivation manipulates; the numpy functions are either lambdified
from them or direct, stable evaluations of the same formulas (checked against each other in
tests/test_theory_softmax_kl.py). Every function broadcasts over leading axes; the vocabulary axis is last.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy as sp

# ---------------------------------------------------------------- sympy objects (theory/softmax_kl.md)
RHO = sp.Symbol("rho", positive=True)  # range of the effective logit shift
P_MASS = sp.Symbol("P", nonnegative=True)  # mass p puts on the top of a two-point shift
TEMP = sp.Symbol("tau", positive=True)

# L3: two-point shift z ∈ {0, ρ} with p-mass P on ρ: KL(p‖q) = log(1 + P(e^ρ − 1)) − Pρ.
TWO_POINT_KL_EXPR = sp.log(1 + P_MASS * (sp.exp(RHO) - 1)) - P_MASS * RHO
# Its maximiser over P ∈ [0, 1] (stationary point of a concave function, inside (0, 1)).
P_STAR_EXPR = 1 / RHO - 1 / (sp.exp(RHO) - 1)
# K(ρ): the value at P*; the exact supremum of KL over all logits with shift range ρ (L3).
KL_SHARP_EXPR = sp.log((sp.exp(RHO) - 1) / RHO) - 1 + RHO / (sp.exp(RHO) - 1)
# L4 (Hoeffding / Popoviciu): KL ≤ ρ²/8.
KL_RANGE_EXPR = RHO**2 / 8
# Taylor series of K at 0 (K is even): used for small ρ where the closed form cancels catastrophically.
_K_SERIES = sp.series(KL_SHARP_EXPR, RHO, 0, 12).removeO()


def lse_symbols(n: int) -> tuple[list[sp.Symbol], list[sp.Symbol]]:
    """Real symbols a_0..a_{n-1} (logits) and z_0..z_{n-1} (shift)."""
    return list(sp.symbols(f"a0:{n}", real=True)), list(sp.symbols(f"z0:{n}", real=True))


def _lse(v: list[sp.Expr]) -> sp.Expr:
    return sp.log(sum(sp.exp(x) for x in v))


def kl_definition_exprs(n: int) -> dict[str, sp.Expr]:
    """KL in both directions, by definition Σ p log(p/q) and in the lse forms L1 / L1' (temperature 1)."""
    a, z = lse_symbols(n)
    az = [ai + zi for ai, zi in zip(a, z, strict=True)]
    p = [sp.exp(ai) / sum(sp.exp(x) for x in a) for ai in a]
    q = [sp.exp(x) / sum(sp.exp(y) for y in az) for x in az]
    return {
        "ref_theta_definition": sum(pi * sp.log(pi / qi) for pi, qi in zip(p, q, strict=True)),
        "ref_theta_lse": _lse(az) - _lse(a) - sum(pi * zi for pi, zi in zip(p, z, strict=True)),
        "theta_ref_definition": sum(qi * sp.log(qi / pi) for pi, qi in zip(p, q, strict=True)),
        "theta_ref_lse": _lse(a) - _lse(az) + sum(qi * zi for qi, zi in zip(q, z, strict=True)),
    }


def variance_form_exprs(n: int) -> dict[str, sp.Expr]:
    """φ(t) = lse(a + t z) − lse(a) − t pᵀz (so φ(1) = KL(p‖q)) and Var_{p_t}(z), p_t = softmax(a + t z).

    L2: φ(0) = φ'(0) = 0 and φ''(t) = Var_{p_t}(z), hence KL(p‖q) = ∫₀¹ (1 − t) Var_{p_t}(z) dt.
    """
    a, z = lse_symbols(n)
    t = sp.Symbol("t", real=True)
    at = [ai + t * zi for ai, zi in zip(a, z, strict=True)]
    norm = sum(sp.exp(x) for x in at)
    pt = [sp.exp(x) / norm for x in at]
    p0 = [sp.exp(ai) / sum(sp.exp(x) for x in a) for ai in a]
    mean = sum(pi * zi for pi, zi in zip(pt, z, strict=True))
    return {
        "t": t,
        "phi": _lse(at) - _lse(a) - t * sum(pi * zi for pi, zi in zip(p0, z, strict=True)),
        "var": sum(pi * zi**2 for pi, zi in zip(pt, z, strict=True)) - mean**2,
    }


# ---------------------------------------------------------------- numpy: exact KL (lse forms L1 / L1')
def _lse_np(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def log_softmax(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x - _lse_np(x)[..., None]


def kl_ref_theta(a: Any, z: Any, temperature: float = 1.0) -> np.ndarray:
    """KL(π_ref‖π_θ) = KL(softmax(a/τ) ‖ softmax((a+z)/τ)), per context (L1). Shape: a, z (..., V) → (...)."""
    a = np.asarray(a, dtype=float) / temperature
    z = np.asarray(z, dtype=float) / temperature
    p = np.exp(log_softmax(a))
    # KL is invariant to constant shifts of z; shifting by the max keeps exp(a + z) from overflowing.
    z = z - np.max(z, axis=-1, keepdims=True)
    return np.maximum(_lse_np(a + z) - _lse_np(a) - np.sum(p * z, axis=-1), 0.0)


def kl_theta_ref(a: Any, z: Any, temperature: float = 1.0) -> np.ndarray:
    """KL(π_θ‖π_ref) = KL(softmax((a+z)/τ) ‖ softmax(a/τ)), per context (L1')."""
    a = np.asarray(a, dtype=float)
    z = np.asarray(z, dtype=float)
    return kl_ref_theta(a + z, -z, temperature)


def logit_range(z: Any, temperature: float = 1.0) -> np.ndarray:
    """ρ = (max z − min z)/τ over the last axis."""
    z = np.asarray(z, dtype=float)
    return (np.max(z, axis=-1) - np.min(z, axis=-1)) / temperature


# ---------------------------------------------------------------- numpy: bounds in terms of the range
_k_series = sp.lambdify(RHO, _K_SERIES, "numpy")
kl_range_bound = sp.lambdify(RHO, KL_RANGE_EXPR, "numpy")  # ρ²/8 (L4)
kl_range_bound.__doc__ = "ρ²/8: Hoeffding / Popoviciu bound on KL in either direction (L4)."
two_point_kl = sp.lambdify((P_MASS, RHO), TWO_POINT_KL_EXPR, "numpy")
p_star = sp.lambdify(RHO, P_STAR_EXPR, "numpy")


def kl_sharp_bound(rho: Any) -> np.ndarray:
    """K(ρ) = log((e^ρ−1)/ρ) − 1 + ρ/(e^ρ−1): exact sup of KL (either direction) over logits with range ρ.

    Stable for all ρ ≥ 0: Taylor series (to ρ¹⁰) below ρ = 0.1, and for larger ρ the closed form rewritten
    with expm1 so nothing overflows: log(e^ρ − 1) = ρ + log(1 − e^{−ρ}), ρ/(e^ρ − 1) = ρe^{−ρ}/(1 − e^{−ρ}).
    """
    rho = np.asarray(rho, dtype=float)
    if np.any(rho < 0):
        raise ValueError("rho (a logit range) must be >= 0")
    big = np.maximum(rho, 0.1)
    one_minus = -np.expm1(-big)  # 1 − e^{−ρ}
    closed = big + np.log(one_minus) - np.log(big) - 1.0 + big * np.exp(-big) / one_minus
    return np.where(rho < 0.1, _k_series(rho), closed)


def kl_bounds(z: Any, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """All range-based upper bounds on KL in EITHER direction for the shift z (any base logits), per context.

    Returns the chain K(ρ) ≤ ρ²/8 ≤ ‖z' − mean z'‖²/4 ≤ ‖z'‖²/4 with z' = z/τ (L3–L5), and ρ itself.
    """
    zp = np.asarray(z, dtype=float) / temperature
    rho = logit_range(zp)
    centred = zp - np.mean(zp, axis=-1, keepdims=True)
    return {
        "range": rho,
        "sharp": kl_sharp_bound(rho),
        "range_sq_over_8": kl_range_bound(rho),
        "centred_l2_sq_over_4": np.sum(centred**2, axis=-1) / 4,
        "l2_sq_over_4": np.sum(zp**2, axis=-1) / 4,
    }


def logprob_change(a: Any, z: Any, temperature: float = 1.0) -> np.ndarray:
    """log π_θ(y) − log π_ref(y) for every y (last axis); |·| ≤ ρ by L6."""
    a = np.asarray(a, dtype=float)
    z = np.asarray(z, dtype=float)
    return log_softmax((a + z) / temperature) - log_softmax(a / temperature)
