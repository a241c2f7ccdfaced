"""Rank scaling of the early-phase KL of single-layer LoRA GRPO: KL ∝ r^γ (derivation: theory/rank_scaling.md).

Notation (theory/rank_scaling.md §0):
    r, d        LoRA rank, input dimension;   σ² = 1/(3d) variance of an entry of A₀ ~ U[−1/√d, 1/√d]
    s(r)        LoRA scaling (theory/apriori.py A1) with α(r) from the α rule: "r" (α = r), "2r" (α = 2r) or
                "fixed" (α = α₀); σ_s = d log s / d log r
    M = A₀ᵀA₀   (d, d), rank r; E[M] = rσ² I
    ḡ ∈ R^d     the accumulated logit-gradient direction (V = 2: the gradient of the logit difference)
    E‖M ḡ‖²  = σ⁴‖ḡ‖² · r(r + d − 1/5)          (exact, uniform entries: E a⁴ = 9σ⁴/5)   [§2, eq. M2]
    E‖A₀ ḡ‖² = σ² ‖ḡ‖² · r
Leading-order E[max-context KL] up to r-independent factors (§3):
    "sgd" clip inactive   s⁴ · r(r + d − 1/5)                 (z = −s²ηT ḡᵀ M x)
    "sgd" clip active     s² · (r + d − 1/5)/d                 (each step moves B by exactly ηc)
    "adam"/"adamw"        s² · r(d + c_A(r − 1)), c_A ∈ [2/π, 1]   (each B coordinate moves ≈ η per step)
γ = lim_{d→∞} d log E / d log r, i.e. the exponent for r ≪ d; the "mean-field" linearisation M → E[M]
gives one more power of r (§4) and is wrong whenever r < d.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import sympy as sp

from theory.apriori import ALPHA, D_IN, RANK, SCALE_EXPRS
from theory.schema import OPTIMIZER_ALIASES, OPTIMIZERS, SCALINGS

ALPHA_RULES: tuple[str, ...] = ("r", "2r", "fixed")
CLIP_REGIMES: tuple[str, ...] = ("inactive", "active")
ALPHA0 = sp.Symbol("alpha_0", positive=True)
# α(r) per rule; "fixed" keeps α = α₀ for every rank.
ALPHA_RULE_EXPRS: dict[str, sp.Expr] = {"r": RANK, "2r": 2 * RANK, "fixed": ALPHA0}

# §2 (M2): second moments of A₀ under peft's init, up to the common factor ‖ḡ‖².
SIGMA2 = 1 / (3 * D_IN)
MOMENT_MG_EXPR = SIGMA2**2 * RANK * (RANK + D_IN - sp.Rational(1, 5))  # E‖A₀ᵀA₀ḡ‖² / ‖ḡ‖²
MOMENT_AG_EXPR = SIGMA2 * RANK  # E‖A₀ḡ‖² / ‖ḡ‖²
# §3.3: E‖A₀ᵀφ‖² for Adam's B row φ, φ_k = F(a_k·g_1, …, a_k·g_T) iid over k: r·dσ²·E φ² + r(r−1)‖E φa‖²,
# ‖E φa‖²/E φ² = c_A σ² with c_A = 2/π for sign-like steps (high SNR) up to 1 for steps linear in the
# gradient (low SNR). We use c_A = 1 (our grid has per-step SNR ≈ 0.3); γ (r ≪ d) does not depend on c_A.
ADAM_COHERENCE = 1
MOMENT_ADAM_EXPR = SIGMA2 * RANK * (D_IN + ADAM_COHERENCE * (RANK - 1))

# Mean-field (M → E[M] = rσ² I) versions, for §4's comparison.
MEAN_FIELD_MG_EXPR = (RANK * SIGMA2) ** 2
MEAN_FIELD_ADAM_EXPR = SIGMA2 * RANK**2 * ADAM_COHERENCE


def _regime_key(optimizer: str, clip: str) -> str:
    opt = OPTIMIZER_ALIASES.get(optimizer, optimizer)
    if opt not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {OPTIMIZERS + tuple(OPTIMIZER_ALIASES)}, got {optimizer!r}"
        )
    if clip not in CLIP_REGIMES:
        raise ValueError(f"clip must be one of {CLIP_REGIMES}, got {clip!r}")
    return "adam" if opt != "sgd" else ("sgd" if clip == "inactive" else "sgd_clipped")


def scale_expr(scaling: str, alpha_rule: str) -> sp.Expr:
    """s(r) as a sympy expression in r (and α₀ for the "fixed" rule)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule must be one of {ALPHA_RULES}, got {alpha_rule!r}")
    return SCALE_EXPRS[scaling].subs(ALPHA, ALPHA_RULE_EXPRS[alpha_rule])


def alpha_for(alpha_rule: str, rank: int, alpha0: float = 16.0) -> float:
    """α for a rank under a rule ("fixed" uses alpha0)."""
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule must be one of {ALPHA_RULES}, got {alpha_rule!r}")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return float(ALPHA_RULE_EXPRS[alpha_rule].subs({RANK: rank, ALPHA0: alpha0}))


def kl_leading_expr(
    optimizer: str, scaling: str, alpha_rule: str, clip: str = "inactive", mean_field: bool = False
) -> sp.Expr:
    """Leading-order E[max-context KL] as a function of r and d, up to r-independent factors (§3, §4)."""
    s = scale_expr(scaling, alpha_rule)
    key = _regime_key(optimizer, clip)
    if key == "sgd":
        return s**4 * (MEAN_FIELD_MG_EXPR if mean_field else MOMENT_MG_EXPR)
    if key == "sgd_clipped":
        return s**2 * (MEAN_FIELD_MG_EXPR if mean_field else MOMENT_MG_EXPR) / MOMENT_AG_EXPR
    return s**2 * (MEAN_FIELD_ADAM_EXPR if mean_field else MOMENT_ADAM_EXPR)


def local_exponent(expr: sp.Expr) -> sp.Expr:
    """γ(r) = d log E / d log r = r·∂_r log E, as one rational function (sp.cancel)."""
    return sp.cancel(sp.expand_log(RANK * sp.diff(sp.log(expr), RANK), force=True))


@cache
def derive_gamma(
    optimizer: str, scaling: str, alpha_rule: str, clip: str = "inactive", mean_field: bool = False
) -> sp.Expr:
    """γ = lim_{d→∞} r·∂_r log E (the exponent in the regime r ≪ d), derived symbolically."""
    return sp.nsimplify(
        sp.limit(
            local_exponent(kl_leading_expr(optimizer, scaling, alpha_rule, clip, mean_field)), D_IN, sp.oo
        )
    )


def grid_slope(expr: sp.Expr, ranks: Any, d: float) -> float:
    """Least-squares slope of log E(r) on log r over the rank grid at finite d (finite-size prediction)."""
    f = sp.lambdify((RANK, D_IN, ALPHA0), expr, "numpy")
    r = np.asarray(ranks, dtype=float)
    y = np.log(np.abs(f(r, float(d), 16.0)) * np.ones_like(r))
    return float(np.polyfit(np.log(r), y, 1)[0])


# ---------------------------------------------------------------- regimes (stated before any fit)
class RegimeCheck(NamedTuple):
    ok: bool
    lines: list[str]  # one line per inequality: "<inequality>: lhs vs rhs -> ok/FAILS"


class GammaPrediction(NamedTuple):
    gamma: float
    regime: str
    check: Callable[[Mapping[str, float]], RegimeCheck]


# Thresholds of the regime inequalities (theory/rank_scaling.md §5). Each keeps its neglected term ≤ ~5 %.
R_OVER_D_MAX = 1 / 8  # r_max/d: finite-d slope correction ≤ 0.03
RANGE_MAX = 0.2  # early phase: logit-shift range ρ ≤ 0.2, so KL = ρ²/8·(1 + O(ρ²)) and ∇ at W_t ≈ at W₀
DRIFT_MAX = 0.05  # ‖A_T − A₀‖_F/‖A₀‖_F: A ≈ A₀ (second-order movement of A neglected)
SNR_WALK_MAX = 0.1  # clip active: (T − 1)·ρ̂² ≤ 0.1 (per-step directions nearly independent), or
SNR_COHERENT_MIN = 3.0  # ρ̂ ≥ 3 (directions nearly equal); ρ̂ = per-step gradient SNR, §3.2
TORCH_CLIP_EPS = 1e-6  # torch's clip coefficient c/(‖g‖ + 1e-6): need ‖g‖ ≥ 100·1e-6 so steps are ≈ ηc
ADAM_REACH_MAX = 0.1  # Adam: ηT·√(3 d r_max) — A's own Adam drift against A₀x (§3.3)
DECAY_MAX = 0.01  # ηT·λ: weight decay negligible


def snr_from_coherence(coherence: float, steps: int) -> float:
    """Per-step gradient SNR ρ̂ = ‖ḡ‖/‖n‖ from the coherence c = ‖Σ_t G_t‖/Σ_t‖G_t‖ of T steps.

    With G_t = ḡ + n_t (independent noise): c² ≈ (T²ρ² + T)/(T²(1 + ρ²)), so ρ² = (c²T − 1)/(T(1 − c²)).
    Returns 0 when T ≤ 1 or c² ≤ 1/T (no detectable common direction), inf when c = 1 and T > 1.
    """
    if steps <= 1:
        return 0.0
    c2 = min(float(coherence) ** 2, 1.0)
    if c2 >= 1.0:
        return float("inf")
    return float(np.sqrt(max(0.0, (c2 * steps - 1) / (steps * (1 - c2)))))


def _ineq(name: str, lhs: float, op: str, rhs: float) -> tuple[bool, str]:
    ok = bool(lhs <= rhs) if op == "<=" else bool(lhs >= rhs) if op == ">=" else bool(lhs == rhs)
    return ok, f"{name}: {lhs:.4g} {op} {rhs:.4g} -> {'ok' if ok else 'FAILS'}"


def _rank_item(diag: Mapping[str, float]) -> tuple[bool, str]:
    return _ineq("r_max/d (r << d)", diag["r_max"] / diag["d"], "<=", R_OVER_D_MAX)


def _adam_items(diag: Mapping[str, float]) -> list[tuple[bool, str]]:
    reach = diag["eta_T"] * np.sqrt(3 * diag["d"] * diag["r_max"])
    return [
        _ineq("eta*T*sqrt(3 d r_max)", float(reach), "<=", ADAM_REACH_MAX),
        _ineq("eta*T*weight_decay", diag["eta_T"] * diag["weight_decay"], "<=", DECAY_MAX),
    ]


def hyperparameter_check(optimizer: str, diag: Mapping[str, float]) -> RegimeCheck:
    """The regime inequalities that hyper-parameters alone decide, for Adam(W): r_max/d, ηT·√(3 d r_max) and
    ηT·λ (`diag` keys d, r_max, eta_T = Σ lr, weight_decay). The others (logit range, A drift, clipping
    statistics) need a trained adapter; SGD's regime is decided by its clipping statistics, so it is refused."""
    if _regime_key(optimizer, "inactive") != "adam":
        raise ValueError(f"hyperparameter_check covers Adam(W) only, got optimizer={optimizer!r}")
    items = [_rank_item(diag), *_adam_items(diag)]
    return RegimeCheck(all(ok for ok, _ in items), [line for _, line in items])


def _make_check(key: str, measure: str) -> Callable[[Mapping[str, float]], RegimeCheck]:
    def check(diag: Mapping[str, float]) -> RegimeCheck:
        """`diag` keys: d, r_max, vocab_size, w0_scale, max_range, max_drift, clip_fraction_min/max,
        min_coherence, min_grad_norm, steps, eta_T (Σ lr), weight_decay."""
        items = [_rank_item(diag)]
        if measure == "max":  # §6: a max over contexts / the ball needs a rank-one centred gradient
            items.append(_ineq("V (rank-one centred gradient)", diag["vocab_size"], "==", 2))
        items += [
            _ineq("max logit range rho (early phase)", diag["max_range"], "<=", RANGE_MAX),
            _ineq("max ||A_T - A0||/||A0||", diag["max_drift"], "<=", DRIFT_MAX),
        ]
        if key == "sgd":
            items.append(_ineq("fraction of clipped steps", diag["clip_fraction_max"], "==", 0.0))
        elif key == "sgd_clipped":
            items.append(_ineq("fraction of clipped steps", diag["clip_fraction_min"], "==", 1.0))
            items.append(_ineq("min pre-clip grad norm", diag["min_grad_norm"], ">=", 100 * TORCH_CLIP_EPS))
            rho = snr_from_coherence(diag["min_coherence"], int(diag["steps"]))
            walk_ok, walk = _ineq(
                "(T-1)*snr^2 (random-walk limit)", (diag["steps"] - 1) * rho**2, "<=", SNR_WALK_MAX
            )
            coh_ok, coh = _ineq("snr (coherent limit)", rho, ">=", SNR_COHERENT_MIN)
            items.append((walk_ok or coh_ok, f"{walk}  OR  {coh}"))
        else:
            items += _adam_items(diag)
        return RegimeCheck(all(ok for ok, _ in items), [line for _, line in items])

    return check


MEASURES: tuple[str, ...] = ("max", "mean")
_COMMON = "r_max <= d/8, logit range <= 0.2, A drift <= 5 %"
_REGIME_TEXT = {
    "sgd": f"SGD, clip never active; {_COMMON}",
    "sgd_clipped": (
        "SGD, clip active at every step, per-step gradient SNR either tiny ((T-1) snr^2 <= 0.1) or large "
        f"(snr >= 3); {_COMMON}"
    ),
    "adam": f"Adam(W), eta*T*sqrt(3 d r_max) <= 0.1 and eta*T*lambda <= 0.01; {_COMMON}",
}


def predict_gamma(
    optimizer: str, scaling: str, alpha_rule: str, clip: str = "inactive", measure: str = "max"
) -> GammaPrediction:
    """Predicted exponent γ in E[KL] ∝ r^γ (early phase, r ≪ d), its regime, and a regime checker.

    optimizer ∈ {"sgd", "adam", "adamw"} (+ HF aliases); scaling ∈ {"alpha/r", "rslora", "const"};
    alpha_rule ∈ {"r", "2r", "fixed"}; clip ∈ {"inactive", "active"} (SGD only: is the global grad-norm clip
    active at every step or never); measure ∈ {"max", "mean"}: the max of KL over a context set or the ball
    (regime adds V = 2, a rank-one centred gradient, §6) or its mean over contexts (any V, any W₀).
    γ > 0: KL grows with rank; γ < 0: it falls.
    """
    key = _regime_key(optimizer, clip)
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    gamma = float(derive_gamma(optimizer, scaling, alpha_rule, clip))
    text = _REGIME_TEXT[key] + (", V = 2 (rank-one centred gradient)" if measure == "max" else "")
    return GammaPrediction(gamma, text, _make_check(key, measure))


# ---------------------------------------------------------------- γ fit with a seed bootstrap
class GammaFit(NamedTuple):
    gamma: float
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def _slopes(logr: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """Least-squares slopes of logy (..., n) on logr (n,)."""
    xc = logr - logr.mean()
    return np.sum((logy - logy.mean(axis=-1, keepdims=True)) * xc, axis=-1) / np.sum(xc * xc)


def fit_gamma(ranks: Any, kl: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> GammaFit:
    """γ = LS slope of log(mean over seeds of KL) on log r; CI by resampling seeds (rows) with replacement.

    `kl` has shape (n_seeds, n_ranks), one row per seed (ranks paired within a seed). The mean is taken
    before the log because the theory predicts E[KL]: a mean of logs would add the r-dependent Jensen gap
    E log χ²_r − log r (≈ +0.33 on ranks 1..32 for SGD, theory/rank_scaling.md §6). Percentile interval.
    """
    r = np.asarray(ranks, dtype=float)
    y = np.asarray(kl, dtype=float)
    if y.ndim != 2 or y.shape[1] != r.size or r.size < 2:
        raise ValueError(f"kl must have shape (n_seeds, n_ranks={r.size}) with >= 2 ranks, got {y.shape}")
    if np.any(y <= 0) or np.any(r <= 0):
        raise ValueError("ranks and KL values must be > 0 for a log-log fit")
    if n_boot < 1000:
        raise ValueError(f"n_boot must be >= 1000 for a 95 % percentile interval, got {n_boot}")
    logr = np.log(r)
    gamma = float(_slopes(logr, np.log(y.mean(axis=0))))
    idx = np.random.default_rng(seed).integers(0, y.shape[0], size=(n_boot, y.shape[0]))
    boot = _slopes(logr, np.log(y[idx].mean(axis=1)))  # (n_boot,)
    q = (1 - level) / 2
    lo, hi = np.quantile(boot, [q, 1 - q])
    return GammaFit(gamma, float(lo), float(hi))
