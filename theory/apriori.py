"""A-priori KL bound for single-layer LoRA GRPO, from hyper-parameters and the input radius only.

Derivation, assumptions and proofs: theory/apriori.md (results A1–A7); tests: tests/test_theory_apriori.py.

Notation:
    π_θ(·|x) = softmax(W x / τ),  W = W₀ + s(r)·B A,  B ∈ R^{V×r} (B₀ = 0),  A ∈ R^{r×d},  ‖x‖₂ ≤ R
    η_t = lr·λ(t−1)      learning rate of optimiser step t = 1..T (HF LambdaLR multiplier λ)
    S = Σ_t η_t          lr sum (A2, closed forms per HF schedule)
    C_t                  Adam per-coordinate step constant, |Δθ_t| ≤ η_t C_t (A3)
    M = Σ_t η_t C_t      Adam per-coordinate reach
    a₀ ≥ ‖A₀‖₂           spectral norm of lora_A at init: realised, worst case √r, or w.p. ≥ 1 − δ (A4)
    F*(a₀, ρ)            max of b·(a₀ + a) over a² + b² ≤ ρ² (A5)
Result (A6/A7): for every x with ‖x‖₂ ≤ R and after any T steps, the logit shift z = ΔW x / τ has
    range(z) ≤ ρ_SGD  = √2 · R · s · F*(a₀, c·S) / τ                  (SGD, global grad-norm clip c)
    range(z) ≤ ρ_Adam = 2 · R · s · M√r · (a₀ + M√(r d)) / τ           (Adam / AdamW)
and both KL(π_ref‖π_θ) and KL(π_θ‖π_ref) (per context) are ≤ K(ρ) ≤ ρ²/8 (theory/softmax_kl.md L3/L4).
Rank enters through three separate factors, returned by name: s(r), a₀(r), and the optimiser reach
(c·S for SGD — rank-free; 2M√r and M√(rd) for Adam, which moves every coordinate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from functools import lru_cache
from typing import Any

import numpy as np
import sympy as sp

from theory.schema import SCALINGS, SCHEDULES, BoundInputs
from theory.softmax_kl import kl_range_bound, kl_sharp_bound

# ---------------------------------------------------------------- sympy symbols
ALPHA, RANK, D_IN, VOCAB = sp.symbols("alpha r d V", positive=True)
BETA1, BETA2 = sp.symbols("beta1 beta2", positive=True)
STEP = sp.Symbol("t", positive=True, integer=True)
A0, RHO_J, CLIP, LR_SUM, REACH, RADIUS, TEMP = sp.symbols("a0 rho c S M R tau", nonnegative=True)
WARM_M, WARM_W, DECAY_N = sp.symbols("m W n", positive=True, integer=True)

# A1: LoRA scaling s(r) (peft: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora=True).
SCALE_EXPRS: dict[str, sp.Expr] = {"alpha/r": ALPHA / RANK, "rslora": ALPHA / sp.sqrt(RANK), "const": ALPHA}

# A2: closed forms of Σ λ(t) over HF schedules. Warm-up part over m = min(T, W) steps: Σ_{t<m} t/W;
# decay part over n = T − W ≥ 1 steps: constant n, linear Σ_{k=1}^{n} k/n, cosine Σ_{k<n} ½(1 + cos(πk/n)).
WARMUP_SUM_EXPR = WARM_M * (WARM_M - 1) / (2 * WARM_W)
DECAY_SUM_EXPRS: dict[str, sp.Expr] = {
    "constant": DECAY_N,
    "linear": (DECAY_N + 1) / 2,
    "cosine": (DECAY_N + 1) / 2,
}

# A3: Adam step constant with bias correction (γ = β1²/β2 < 1).
GAMMA_EXPR = BETA1**2 / BETA2
ADAM_C_EXPR = (
    (1 - BETA1)
    / sp.sqrt(1 - BETA2)
    * sp.sqrt(1 - BETA2**STEP)
    / (1 - BETA1**STEP)
    * sp.sqrt((1 - GAMMA_EXPR**STEP) / (1 - GAMMA_EXPR))
)
ADAM_C_LIMIT_EXPR = (1 - BETA1) / (sp.sqrt(1 - BETA2) * sp.sqrt(1 - GAMMA_EXPR))

# A5: F*(a0, ρ) = max { b (a0 + a) : a, b ≥ 0, a² + b² ≤ ρ² }, attained at a = ρu, b = ρ√(1 − u²) with
# u = 2ρ / (a0 + √(a0² + 8ρ²)) (the root in [0, 1] of 2ρu² + a0 u − ρ = 0, written without cancellation).
U_STAR_EXPR = 2 * RHO_J / (A0 + sp.sqrt(A0**2 + 8 * RHO_J**2))
F_STAR_EXPR = RHO_J * sp.sqrt(1 - U_STAR_EXPR**2) * (A0 + RHO_J * U_STAR_EXPR)

# A6 / A7: bound on max_{‖x‖≤R} range(ΔW x / τ).
SGD_RANGE_EXPR = (
    sp.sqrt(2) * RADIUS * sp.Symbol("s", positive=True) * F_STAR_EXPR.subs(RHO_J, CLIP * LR_SUM) / TEMP
)
ADAM_RANGE_EXPR = (
    2
    * RADIUS
    * sp.Symbol("s", positive=True)
    * REACH
    * sp.sqrt(RANK)
    * (A0 + REACH * sp.sqrt(RANK * D_IN))
    / TEMP
)

_f_star = sp.lambdify((A0, RHO_J), F_STAR_EXPR, "numpy")
_sgd_range = sp.lambdify(
    (sp.Symbol("s", positive=True), A0, CLIP, LR_SUM, RADIUS, TEMP), SGD_RANGE_EXPR, "numpy"
)
_adam_range = sp.lambdify(
    (sp.Symbol("s", positive=True), A0, REACH, RANK, D_IN, RADIUS, TEMP), ADAM_RANGE_EXPR, "numpy"
)
_adam_c = sp.lambdify((STEP, BETA1, BETA2), ADAM_C_EXPR, "numpy")
_warm_sum = sp.lambdify((WARM_M, WARM_W), WARMUP_SUM_EXPR, "numpy")
_decay_sum = {k: sp.lambdify(DECAY_N, v, "numpy") for k, v in DECAY_SUM_EXPRS.items()}
_scale = {k: sp.lambdify((ALPHA, RANK), v, "numpy") for k, v in SCALE_EXPRS.items()}


# ---------------------------------------------------------------- A1: scaling
def lora_scale(scaling: str, alpha: Any, rank: Any) -> Any:
    """s(r): alpha/r ("alpha/r", peft default), alpha/sqrt(r) ("rslora"), alpha ("const"). Broadcasts."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    alpha, rank = np.broadcast_arrays(np.asarray(alpha, dtype=float), np.asarray(rank, dtype=float))
    out = _scale[scaling](alpha, rank) * np.ones_like(rank)  # "const" ignores rank: keep the broadcast shape
    return out if out.ndim else float(out)


# ---------------------------------------------------------------- A2: learning-rate schedules
def lr_multipliers(schedule: str, steps: int, warmup: int = 0) -> np.ndarray:
    """HF LambdaLR multipliers λ(t), t = 0..steps−1; optimiser step t+1 uses lr·λ(t).

    Same formulas as transformers.optimization (get_constant_schedule, get_constant_schedule_with_warmup,
    get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup with num_cycles = 0.5); "constant"
    ignores warm-up, as HF's get_scheduler("constant") does.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    t = np.arange(int(steps), dtype=float)
    w = 0 if schedule == "constant" else int(warmup)
    warm = t / max(1, w)
    if schedule in ("constant", "constant_with_warmup"):
        decay = np.ones_like(t)
    else:
        progress = (t - w) / max(1, int(steps) - w)
        decay = (
            np.maximum(0.0, (int(steps) - t) / max(1, int(steps) - w))
            if schedule == "linear"
            else np.maximum(0.0, 0.5 * (1.0 + np.cos(np.pi * progress)))
        )
    return np.where(t < w, warm, decay)


def sum_lr(schedule: str, lr: Any, steps: Any, warmup: Any = 0) -> Any:
    """S = Σ_{t<steps} lr·λ(t) in closed form (A2); broadcasts over lr / steps / warmup.

    Warm-up part m(m−1)/(2W) with m = min(T, W); decay part over n = T − W steps: n (constant),
    (n+1)/2 (linear and cosine; 0 when n = 0). E.g. cosine or linear with W ≥ 1 warm-up steps and T ≥ W:
    S = lr·T/2; without warm-up S = lr·(T+1)/2.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    lr, T, W = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (lr, steps, warmup)))
    if schedule == "constant":
        W = np.zeros_like(W)
    m = np.minimum(T, W)
    warm = np.where(W > 0, _warm_sum(m, np.maximum(W, 1.0)), 0.0)
    n = np.maximum(T - W, 0.0)
    kind = "constant" if schedule in ("constant", "constant_with_warmup") else schedule
    decay = np.where(n > 0, _decay_sum[kind](n), 0.0)
    out = lr * (warm + decay)
    return out if out.ndim else float(out)


# ---------------------------------------------------------------- A3: Adam step constant
def adam_step_constant(t: Any, beta1: float, beta2: float) -> Any:
    """C_t = sup over gradient histories of |m̂_t|/√v̂_t at Adam step t ≥ 1 (A3); the step is ≤ η_t·C_t.

    C_1 = 1; C_t increases to C_∞ = (1−β1)/(√(1−β2)·√(1−β1²/β2)) (≈ 7.27 for (0.9, 0.999)).
    """
    return _adam_c(np.asarray(t, dtype=float), float(beta1), float(beta2))


def adam_step_constant_limit(beta1: float, beta2: float) -> float:
    """C_∞ = sup_t C_t (A3)."""
    return float(ADAM_C_LIMIT_EXPR.subs({BETA1: beta1, BETA2: beta2}))


def adam_reach(schedule: str, lr: float, steps: int, warmup: int, betas: tuple[float, float]) -> float:
    """M = Σ_{t=1}^{T} η_t C_t: bound on how far Adam moves any single coordinate in T steps (A3)."""
    lam = lr_multipliers(schedule, steps, warmup)
    t = np.arange(1, int(steps) + 1)
    return float(lr * np.sum(lam * adam_step_constant(t, *betas))) if steps else 0.0


# ---------------------------------------------------------------- A4: ‖A₀‖₂ under peft's init
_NET_EPS = np.linspace(0.01, 0.45, 89)  # fixed grid, chosen before seeing A₀: the union bound stays valid


def a0_norm_bound(rank: Any, in_features: Any, delta: float | None = None) -> Any:
    """Bound on ‖A₀‖₂ for peft's init, A₀ ∈ R^{r×d} with iid entries U[−1/√d, 1/√d] (A4).

    delta None: worst case √r (every entry ≤ 1/√d, so ‖A₀‖₂ ≤ ‖A₀‖_F ≤ √r; tight for constant entries).
    delta given: holds with probability ≥ 1 − delta: min of √r, the Hoeffding bound on ‖A₀‖_F (level δ/2)
    √(r/3 + √(r ln(2/δ)/(2d))), and the ε-net bound (level δ/2)
    min_ε √(2((r+d) ln(1+2/ε) + ln(2/δ))/d)/(1−2ε).
    """
    r = np.asarray(rank, dtype=float)
    d = np.asarray(in_features, dtype=float)
    worst = np.sqrt(r) + 0.0 * d
    if delta is None:
        return worst if worst.ndim else float(worst)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    log_term = math.log(2.0 / delta)
    frob = np.sqrt(r / 3 + np.sqrt(r * log_term / (2 * d)))
    e = _NET_EPS.reshape((-1,) + (1,) * np.ndim(worst))
    net = np.min(np.sqrt(2 * ((r + d) * np.log1p(2 / e) + log_term) / d) / (1 - 2 * e), axis=0)
    out = np.minimum(worst, np.minimum(frob, net))
    return out if out.ndim else float(out)


def _a0(inputs: BoundInputs) -> float:
    if inputs.a0_norm is not None:
        return float(inputs.a0_norm)
    return float(a0_norm_bound(inputs.rank, inputs.in_features, inputs.a0_delta))


# ---------------------------------------------------------------- A5–A7: the bound
def joint_product_max(a0: Any, rho: Any) -> Any:
    """F*(a0, ρ) = max { b·(a0 + a) : a, b ≥ 0, a² + b² ≤ ρ² } (A5), closed form; broadcasts."""
    return _f_star(np.asarray(a0, dtype=float), np.asarray(rho, dtype=float))


def _bound_core(
    inputs: BoundInputs, V: Any, d: Any, r: Any, R: Any, s: Any, a0: Any, lr_total: Any, reach_m: Any
) -> dict[str, Any]:
    """Shared arithmetic of the scalar and array versions (A6/A7); every numeric argument broadcasts.

    Only the optimiser, grad_clip and temperature are read from `inputs`.
    """
    tau = float(inputs.temperature)
    if inputs.optimizer == "sgd":
        c = float(inputs.grad_clip)  # type: ignore[arg-type]
        rho_joint = c * lr_total  # joint Frobenius reach of (A_T − A₀, B_T): rank-free
        out = {
            "optimizer_reach": rho_joint,
            "b_frob": rho_joint,
            "b_row_diff": np.sqrt(2) * rho_joint,
            "a_op": a0 + rho_joint,
            "ba_product": joint_product_max(a0, rho_joint),  # ≥ ‖B_T‖_F · ‖A_T‖₂ (A5)
            "logit_range": _sgd_range(s, a0, c, lr_total, R, tau),
        }
    else:
        out = {
            "optimizer_reach": reach_m,  # per-coordinate reach M
            "b_frob": reach_m * np.sqrt(V * r),
            "b_row_diff": 2 * reach_m * np.sqrt(r),
            "a_op": a0 + reach_m * np.sqrt(r * d),
            "logit_range": _adam_range(s, a0, reach_m, r, d, R, tau),
        }
        out["ba_product"] = out["b_frob"] * out["a_op"]
    out["delta_w_op"] = s * out["ba_product"]
    rho = np.asarray(out["logit_range"], dtype=float)
    sharp, hoeff = kl_sharp_bound(rho), kl_range_bound(rho)
    out.update(
        scale=s,
        a0_norm=a0,
        sum_lr=lr_total,
        kl_ref_theta=sharp,  # KL(π_ref‖π_θ), per context, ≤ K(ρ)
        kl_theta_ref=sharp,  # KL(π_θ‖π_ref), per context: the same supremum (softmax_kl.md L3)
        kl_ref_theta_range_sq_over_8=hoeff,
        kl_theta_ref_range_sq_over_8=hoeff,
    )
    return out


def apriori_kl_bound(inputs: BoundInputs) -> dict[str, Any]:
    """Upper bounds on max_{‖x‖₂≤R} KL after `inputs.steps` optimiser steps, both directions (A6/A7).

    Keys: kl_ref_theta = bound on KL(π_ref‖π_θ) (MERL's direction) and kl_theta_ref = bound on KL(π_θ‖π_ref)
    (what k1/k3 on samples of π_θ estimate), both per context, via the sharp K(ρ); *_range_sq_over_8 via ρ²/8.
    Reach quantities: logit_range (ρ ≥ max_x range(ΔW x)/τ), b_frob (≥ ‖B_T‖_F), b_row_diff
    (≥ max_ij ‖B_i − B_j‖₂), a_op (≥ ‖A_T‖₂), delta_w_op (≥ ‖ΔW‖₂ = ‖s B_T A_T‖₂).
    Rank factors (named): scale = s(r), a0_norm = a₀ used, optimizer_reach = c·S (SGD) or M (Adam, per
    coordinate; the bound then multiplies it by √r and √(rd)).
    Also sum_lr = S, a0_mode, adam_step_constant_max.
    """
    s = float(lora_scale(inputs.scaling, inputs.alpha, inputs.rank))
    lr_total = float(sum_lr(inputs.schedule, inputs.lr, inputs.steps, inputs.warmup))
    reach_m = (
        adam_reach(inputs.schedule, inputs.lr, inputs.steps, inputs.warmup, inputs.betas)
        if inputs.optimizer != "sgd"
        else float("nan")
    )
    out = _bound_core(
        inputs,
        inputs.vocab_size,
        inputs.in_features,
        inputs.rank,
        inputs.input_radius,
        s,
        _a0(inputs),
        lr_total,
        reach_m,
    )
    out = {k: float(v) for k, v in out.items()}
    out["a0_mode"] = inputs.a0_mode
    out["adam_step_constant_max"] = (
        adam_step_constant_limit(*inputs.betas) if inputs.optimizer != "sgd" else float("nan")
    )
    return out


_ARRAY_FIELDS = (
    "rank",
    "alpha",
    "lr",
    "steps",
    "warmup",
    "vocab_size",
    "in_features",
    "input_radius",
    "a0_norm",
)


@lru_cache(maxsize=4096)
def _adam_unit_reach(schedule: str, steps: int, warmup: int, betas: tuple[float, float]) -> float:
    return adam_reach(schedule, 1.0, steps, warmup, betas)


def apriori_kl_bound_array(inputs: BoundInputs, **overrides: Any) -> dict[str, np.ndarray]:
    """Vectorised apriori_kl_bound: `overrides` may give arrays for any of rank, alpha, lr, steps, warmup,
    vocab_size, in_features, input_radius, a0_norm; they broadcast together (numpy rules) and every other
    field comes from `inputs`. Evaluates the same lambdified expressions as apriori_kl_bound.

    Each broadcast element is validated like a BoundInputs (ValueError on rank ≤ 0, lr < 0, ...).
    """
    unknown = set(overrides) - set(_ARRAY_FIELDS)
    if unknown:
        raise ValueError(f"overrides must be among {_ARRAY_FIELDS}; got {sorted(unknown)}")
    base = asdict(inputs)
    arrays = np.broadcast_arrays(
        *(
            np.asarray(overrides.get(k, base[k] if base[k] is not None else np.nan), dtype=float)
            for k in _ARRAY_FIELDS
        )
    )
    f = dict(zip(_ARRAY_FIELDS, arrays, strict=True))
    # validate every distinct combination through the schema (cheap: dataclass construction)
    for row in {tuple(v) for v in np.stack([a.ravel() for a in arrays], axis=1).tolist()}:
        kw = dict(zip(_ARRAY_FIELDS, row, strict=True))  # floats: the schema rejects non-integral ranks
        kw["a0_norm"] = None if math.isnan(kw["a0_norm"]) else kw["a0_norm"]
        replace(inputs, **kw)
    s = lora_scale(inputs.scaling, f["alpha"], f["rank"])
    if inputs.a0_norm is not None or "a0_norm" in overrides:
        a0 = f["a0_norm"]
    else:
        a0 = a0_norm_bound(f["rank"], f["in_features"], inputs.a0_delta)
    lr_total = sum_lr(inputs.schedule, f["lr"], f["steps"], f["warmup"])
    reach_m = np.full(f["lr"].shape, np.nan)
    if inputs.optimizer != "sgd":
        unit = np.vectorize(lambda T, W: _adam_unit_reach(inputs.schedule, int(T), int(W), inputs.betas))
        reach_m = f["lr"] * unit(f["steps"], f["warmup"])
    core = _bound_core(
        inputs, f["vocab_size"], f["in_features"], f["rank"], f["input_radius"], s, a0, lr_total, reach_m
    )
    return {k: np.asarray(v, dtype=float) for k, v in core.items()}
