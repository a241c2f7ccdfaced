"""A predictive law for the mean KL after T steps of single-layer LoRA GRPO (theory/rank_scaling.md §10).

KL(r) itself, not only its exponent: three regimes (small step, coherent A drift, saturated) and the
crossovers between them, from what exists before step 1 (BoundInputs, the realised ‖A₀‖₂, N, π_ref's spread).

Notation (rank_scaling.md §0 and §10):
    V, d, r, s, R, τ     actions, input dim, LoRA rank, LoRA scale s(r), input radius, temperature
    λ_t, η_t = lr·λ_t    HF schedule multiplier and lr of step t = 1..T
    S = Σ η_t, S₂ = Σ η_t², S' = S − η_1            lr sums (A gets its first gradient at step 2)     [§10.0]
    σ                    entry scale of A₀: 1/√(3d) (peft), or a0_op/(√d + √r − 1)                  [§10.1]
    ρ̂² = ζ² N / d        per-step gradient SNR, N contexts per step, ζ calibrated                   [§10.2]
    h = Σ_j c_j² / S²    Adam noise averaging, c_j = Σ_{t≥j} η_t (1−β₁)β₁^{t−j}/(1−β₁^t)           [§10.3]
    ⟨φ²⟩                 mean-square Adam step per coordinate, in units of S                         [§10.3]
    κ_n, c_n             clipped-SGD step coherence, n = (V − 1) r                                     [§10.4]
    X (Adam), v (SGD)    A-drift amplification of the rank-aligned part of the logit shift           [§10.5]
    q = q_inc + q_aln    per-direction variance over contexts of the centred logit shift z/τ         [§10.3–5]
    K_fwd(q), K_bwd(q)   mean KL of an isotropic Gaussian shift of variance q (exact KL, fixed QMC)  [§10.6]
Regime: "saturated" if q ≥ q_sat (local exponent of K_fwd below 3/4), else "coherent" if q_aln ≥ q_inc,
else "small_step" (§10.7). In the small-step limit the rank slope is predict_gamma's (§10.8).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np
import sympy as sp
from scipy.special import erfcx, gammaln, hyp2f1, ndtri, wofz
from scipy.stats import qmc

from theory.apriori import D_IN, RADIUS, RANK, TEMP, VOCAB, lora_scale, lr_multipliers
from theory.bandit import kl_pair
from theory.schema import BoundInputs

CONSTANTS: dict[str, float] = {"snr_zeta": 0.3977, "adam_coherence": 0.1538}
"""The two calibrated constants of the law (rank_scaling.md §10.9), frozen on 2026-11-30.

snr_zeta (ζ): per-context GRPO gradient SNR, ρ̂² = ζ² N/d (§10.2); adam_coherence (c_coh): size of Adam's
coherent A-drift term relative to its §3.3 estimate (§10.5). Fitted by `python benchmarks/calibrate_kl_law.py`
(16 seeds, 100..115): least squares of log10(measured/predicted) mean KL(π_ref‖π_θ) over the calibration grid
d = 128, R = √d, N = 32 contexts × K = 8 samples per step, V ∈ {2, 8 (π_ref logit std 2)}, α/r with α = 2r,
ranks 1..16; AdamW (T = 12, λ = 0.01) at ηT√(3·d·32) ∈ {0.1, 1, 4, 15, 50}, clipped SGD (T = 8, c = 10⁻³) at
c·lr·T ∈ {0.01, 0.1, 0.5, 2, 6} (100 points; fit 0.39770, 0.15384, rounded to 4 digits). Priors were 0.68, 0.3.
"""
C_A = 1.0  # §3.3's c_A (low-SNR limit): the r(r − 1) term, = rank_scaling.ADAM_COHERENCE (tested)
SAT_EXPONENT = 0.75  # §10.6: q_sat is where d log K_fwd / d log q falls to 3/4 (midway between 1 and ½)
_LOGQ = np.arange(-4.0, 5.0 + 1e-9, 0.125)  # log10 q grid of the saturation maps (§10.6)

# ---------------------------------------------------------------- sympy form of §10.3–10.5 (tests lambdify it)
S_SUM, S_PRIME, ELL, SIG, PHI2, XC, BETA_V, AMP_V, SCALE = sp.symbols(
    "S Sp ell sigma phi2 X beta a s", positive=True
)
SNR2, H_AVG, NDIM, VV = sp.symbols("rho2 h n v", positive=True)
COH = sp.Symbol("c_coh", positive=True)
# §10.3/§10.5 Adam: q = V/(V−1)·(sSR/τ)²σ²⟨φ²⟩·[r(d − c_A) + c_A r²(1 + X)²]/d,  X = c_coh S' √d/σ
Q_ADAM_EXPR = (
    VOCAB / (VOCAB - 1) * (SCALE * S_SUM * RADIUS / TEMP) ** 2 * SIG**2 * PHI2
    * (RANK * (D_IN - C_A) + C_A * RANK**2 * (1 + XC) ** 2) / D_IN
)  # fmt: skip
X_EXPR = COH * S_PRIME * sp.sqrt(D_IN) / SIG
# §10.3: ⟨φ²⟩ at zero drift = 1 − (1 − h)·E[1/(1 + ρ̂²Z²)], the expectation in closed form
PHI2_EXPR = 1 - (1 - H_AVG) * sp.sqrt(sp.pi / (2 * SNR2)) * sp.exp(1 / (2 * SNR2)) * sp.erfc(
    1 / sp.sqrt(2 * SNR2)
)
# §10.4 clipped SGD: c_n = (2/n)(Γ((n+1)/2)/Γ(n/2))², κ_n = c_n ρ̂²/(1 + c_n ρ̂²)
C_N_EXPR = 2 / NDIM * (sp.gamma((NDIM + 1) / 2) / sp.gamma(NDIM / 2)) ** 2
KAPPA_EXPR = C_N_EXPR * SNR2 / (1 + C_N_EXPR * SNR2)
# §10.5 clipped SGD: q = (sℓR/τ)²σ²[β(v)(d − 1/5) + r a(v)²]/(d(V − 1)), F(v) = ∫₀^v (1+t²)^(−1/4) dt = 2ℓ/(σ√r)
Q_SGD_EXPR = (
    (SCALE * ELL * RADIUS / TEMP) ** 2 * SIG**2 * (BETA_V * (D_IN - sp.Rational(1, 5)) + RANK * AMP_V**2)
    / (D_IN * (VOCAB - 1))
)  # fmt: skip
F_EXPR = VV * sp.hyper([sp.Rational(1, 4), sp.Rational(1, 2)], [sp.Rational(3, 2)], -(VV**2))
BETA_EXPR = 2 * (sp.sqrt(1 + VV**2) - 1) / F_EXPR**2
AMP_EXPR = VV / F_EXPR


# ---------------------------------------------------------------- numpy building blocks
def schedule_sums(schedule: str, steps: int, warmup: int, beta1: float) -> tuple[float, float, float, float]:
    """(Λ, Λ₂, Λ', h): Σλ_t, Σλ_t², Σλ_t − λ_1 and Adam's averaging factor h (§10.0, §10.3); S = lr·Λ."""
    lam = lr_multipliers(schedule, steps, warmup)
    if lam.size == 0 or lam.sum() == 0:
        return 0.0, 0.0, 0.0, 1.0
    t = np.arange(1, lam.size + 1, dtype=float)
    w = (1 - beta1) * beta1 ** (t[:, None] - t[None, :]) / (1 - beta1 ** t[:, None])  # w_tj, j ≤ t
    c = np.sum(np.tril(w) * lam[:, None], axis=0)
    return (
        float(lam.sum()),
        float(np.sum(lam**2)),
        float(lam.sum() - lam[0]),
        float(np.sum(c**2) / lam.sum() ** 2),
    )


def adam_step_ms(snr2: Any, h: Any, drift: Any = 0.0) -> Any:
    """⟨φ²⟩ = E_Z[(ρ̂²(Z+y)² + h)/(1 + ρ̂²(Z+y)²)] (§10.3; y = drift, §10.5): Voigt form via Faddeeva w."""
    snr2, h, y = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (snr2, h, drift)))
    g = 1 / np.sqrt(np.maximum(snr2, 1e-300))
    lorentz = np.where(y == 0, np.sqrt(np.pi / 2) * g * erfcx(g / np.sqrt(2)),
                       np.sqrt(np.pi / 2) * g * wofz((y + 1j * g) / np.sqrt(2)).real)  # fmt: skip
    return 1 - (1 - h) * lorentz


def step_coherence(snr2: Any, n: Any) -> Any:
    """κ_n = c_nρ̂²/(1 + c_nρ̂²), c_n = (2/n)(Γ((n+1)/2)/Γ(n/2))² (§10.4; c_1 = 2/π, c_∞ = 1)."""
    n = np.asarray(n, dtype=float)
    cn = 2 / n * np.exp(2 * (gammaln((n + 1) / 2) - gammaln(n / 2)))
    return cn * snr2 / (1 + cn * snr2)


def _F(v: Any) -> Any:
    return v * hyp2f1(0.25, 0.5, 1.5, -np.square(v))


def sgd_drift(ell_over_n0: Any) -> tuple[Any, Any, Any]:
    """(v, β, a) for clipped SGD's joint (B, A) motion (§10.5): F(v) = 2ℓ/n₀, β = 2(√(1+v²) − 1)/F², a = v/F."""
    target = 2 * np.asarray(ell_over_n0, dtype=float)
    lo, hi = np.log(np.maximum(target, 1e-300)) - 1, np.log((2 + target) ** 2 + target + 1)
    for _ in range(100):  # bisection on log v (F increasing)
        mid = (lo + hi) / 2
        below = _F(np.exp(mid)) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    v = np.where(target > 0, np.exp((lo + hi) / 2), 0.0)
    F = np.where(v > 0, _F(v), 1.0)
    beta = np.where(v > 0, 2 * v**2 / (np.sqrt(1 + v**2) + 1) / F**2, 1.0)
    return v, beta, np.where(v > 0, v / F, 1.0)


@lru_cache(maxsize=64)
def saturation_map(vocab: int, ref_std: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(log10 q grid, ψ_fwd, ψ_bwd, 1 − c̄, q_sat) of §10.6: K_dir(q) = ½(1 − c̄) q ψ_dir(q).

    Exact KL of z ~ N(0, q I_V) against reference logits a ~ N(0, ref_std² I_V) on a fixed antithetic scrambled
    Sobol sample (2·8192 points for V ≤ 16, fewer above; ψ → 1 exactly as q → 0: numerator and denominator share it).
    """
    n = 2 ** int(np.clip(np.floor(np.log2(2**17 / vocab)), 8, 13))
    dim = vocab * (2 if ref_std > 0 else 1)  # scrambled Sobol (seed 0); pseudo-random beyond its 21201 dims
    rng = np.random.default_rng(0)
    u = qmc.Sobol(dim, scramble=True, seed=0).random(n) if dim <= 21201 else rng.random((n, dim))
    xi = ndtri(u[:, :vocab])
    a = ref_std * ndtri(u[:, vocab:]) if ref_std > 0 else np.zeros_like(xi)
    xi, a = np.concatenate([xi, -xi]), np.concatenate([a, a])
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    var = float(np.mean(np.sum(p * xi**2, -1) - np.sum(p * xi, -1) ** 2))  # E Var_p(ξ) ≈ 1 − c̄
    fwd, bwd = np.empty(_LOGQ.size), np.empty(_LOGQ.size)
    for i, lq in enumerate(_LOGQ):
        kf, kb = kl_pair(a, np.sqrt(10**lq) * xi)
        fwd[i], bwd[i] = kf.mean() / (0.5 * 10**lq * var), kb.mean() / (0.5 * 10**lq * var)
    one_minus_c = 1 - 1 / vocab if ref_std == 0 else var
    slope = 1 + np.gradient(np.log(fwd), _LOGQ * np.log(10))  # d log K_fwd / d log q
    k = int(np.argmax(slope < SAT_EXPONENT))
    lq_sat = np.interp(SAT_EXPONENT, [slope[k], slope[k - 1]], [_LOGQ[k], _LOGQ[k - 1]])
    return _LOGQ, fwd, bwd, one_minus_c, float(10**lq_sat)


def kl_of_q(q: Any, vocab: int, ref_std: float = 0.0) -> tuple[Any, Any]:
    """(K_fwd(q), K_bwd(q)) = mean KL(π_ref‖π_θ), KL(π_θ‖π_ref) at logit-shift variance q (§10.6)."""
    lq_grid, fwd, bwd, omc, _ = saturation_map(int(vocab), float(ref_std))
    q = np.asarray(q, dtype=float)
    lq = np.log10(np.maximum(q, 1e-300))
    top = lq_grid[-1]  # beyond the grid: the asymptotes, K_fwd ∝ √q (ψ ∝ q^−½) and K_bwd → const (ψ ∝ 1/q)
    pf = np.interp(lq, lq_grid, np.log(fwd)) - 0.5 * np.log(10) * np.maximum(lq - top, 0)
    pb = np.interp(lq, lq_grid, np.log(bwd)) - np.log(10) * np.maximum(lq - top, 0)
    return 0.5 * omc * q * np.exp(pf), 0.5 * omc * q * np.exp(pb)


# ---------------------------------------------------------------- the law
def _sigma(inputs: BoundInputs, a0_op: float | None) -> float:
    a0 = a0_op if a0_op is not None else inputs.a0_norm
    d, r = inputs.in_features, inputs.rank
    return float(a0) / (np.sqrt(d) + np.sqrt(r) - 1) if a0 is not None else 1 / np.sqrt(3 * d)  # §10.1


def logit_variance(inputs: BoundInputs, rank: Any, scale: Any, lr: Any, sigma: float, contexts: int,
                   constants: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """q_inc, q_aln (§10.3–10.5) at continuous rank(s) / scale(s) / lr(s); everything else from `inputs`."""
    V, d, R, tau = inputs.vocab_size, inputs.in_features, inputs.input_radius, inputs.temperature
    r, s, lr = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (rank, scale, lr)))
    lam, lam2, lam_p, h = schedule_sums(inputs.schedule, inputs.steps, inputs.warmup, inputs.betas[0])
    snr2 = constants["snr_zeta"] ** 2 * contexts / d  # §10.2
    base = (s * R / tau) ** 2 * sigma**2 / d
    if inputs.optimizer != "sgd":  # §10.3 + §10.5 (Adam)
        X = constants["adam_coherence"] * lr * lam_p * np.sqrt(d) / sigma
        phi2 = adam_step_ms(snr2, h, X / 2)
        pre = V / (V - 1) * base * (lr * lam) ** 2 * phi2
        return {
            "q_inc": pre * r * (d - C_A),
            "q_aln": pre * C_A * r**2 * (1 + X) ** 2,
            "drift": X,
            "phi2": phi2,
        }
    kappa = step_coherence(snr2, (V - 1) * r)  # §10.4 + §10.5 (clipped SGD)
    ell = float(inputs.grad_clip) * lr * np.sqrt((1 - kappa) * lam2 + kappa * lam**2)  # type: ignore[arg-type]
    v, beta, amp = sgd_drift(ell / (sigma * np.sqrt(r)))
    pre = base * ell**2 / (V - 1)
    return {"q_inc": pre * beta * (d - 0.2), "q_aln": pre * r * amp**2, "drift": v, "kappa": kappa}


def _classify(q: float, q_inc: float, q_aln: float, q_sat: float) -> str:
    return "saturated" if q >= q_sat else "coherent" if q_aln > q_inc else "small_step"  # §10.7


def predict_kl(inputs: BoundInputs | Mapping[str, Any], *, a0_op: float | None = None, contexts_per_step: int = 32,
               ref_logit_std: float = 0.0, constants: dict[str, float] | None = None,
               with_crossovers: bool = True) -> dict[str, Any]:  # fmt: skip
    """Expected per-context KL after `inputs.steps` steps, mean over isotropic contexts ‖x‖ = R (§10).

    Adam/AdamW, or SGD with a global grad-norm clip `grad_clip` assumed active at every step. Inputs: BoundInputs
    (or a mapping of its fields, as theory/preregistered/kl_law_prediction.json stores it),
    a0_op (realised ‖A₀‖₂; default inputs.a0_norm, else peft's init), contexts_per_step N (independent GRPO
    groups per step), ref_logit_std (std over contexts of π_ref's logits W₀x per action, before τ; 0 = uniform π_ref),
    constants (default CONSTANTS). Returns kl_ref_theta, kl_theta_ref, regime, crossovers (lr at which the
    coherent / saturated regime starts at this rank; rank_transitions over r ∈ [1, d] at this lr; {} when
    with_crossovers is False), q, q_sat and the parts of q.
    """
    if not isinstance(inputs, BoundInputs):  # a mapping of BoundInputs fields (a pre-registered point's JSON)
        inputs = BoundInputs(**{k: tuple(v) if k == "betas" else v for k, v in dict(inputs).items()})
    c = CONSTANTS if constants is None else constants
    sigma = _sigma(inputs, a0_op)
    s = float(lora_scale(inputs.scaling, inputs.alpha, inputs.rank))
    part = {
        k: float(v)
        for k, v in logit_variance(inputs, inputs.rank, s, inputs.lr, sigma, contexts_per_step, c).items()
    }
    q = part["q_inc"] + part["q_aln"]
    fwd, bwd = kl_of_q(q, inputs.vocab_size, ref_logit_std / inputs.temperature)
    q_sat = saturation_map(inputs.vocab_size, float(ref_logit_std / inputs.temperature))[4]
    return {
        "kl_ref_theta": float(fwd), "kl_theta_ref": float(bwd), "regime": _classify(q, part["q_inc"], part["q_aln"], q_sat),
        "crossovers": _crossovers(inputs, sigma, contexts_per_step, c, q_sat) if with_crossovers else {}, "q": q, "q_sat": q_sat,
        "sigma": sigma, "snr2": c["snr_zeta"] ** 2 * contexts_per_step / inputs.in_features, **part, "constants": dict(c),
    }  # fmt: skip


def _q_parts(
    inputs: BoundInputs, r: Any, lr: Any, sigma: float, n: int, c: dict[str, float]
) -> tuple[Any, Any]:
    s = lora_scale(inputs.scaling, inputs.alpha, r)  # the given α at every rank (predict_kl's own inputs)
    part = logit_variance(inputs, r, s, lr, sigma, n, c)
    return part["q_inc"], part["q_aln"]


def _first_crossing(x: np.ndarray, f: np.ndarray) -> float:
    """Smallest x where the increasing f crosses 0 (linear interpolation in log x); inf if it never does."""
    if not (f >= 0).any():
        return float("inf")
    i = int(np.argmax(f >= 0))
    return float(x[0]) if i == 0 else float(np.exp(np.interp(0, f[i - 1 : i + 1], np.log(x[i - 1 : i + 1]))))


def _crossovers(
    inputs: BoundInputs, sigma: float, n: int, c: dict[str, float], q_sat: float
) -> dict[str, Any]:
    """lr_coherent, lr_saturated at this rank (q grows with lr) and rank_transitions over r ∈ [1, d] at this lr."""
    lrs = np.logspace(-12, 3, 601)
    qi, qa = _q_parts(inputs, inputs.rank, lrs, sigma, n, c)
    with np.errstate(divide="ignore"):
        out: dict[str, Any] = {
            "lr_coherent": _first_crossing(lrs, np.log(qa) - np.log(qi)),
            "lr_saturated": _first_crossing(lrs, np.log(qi + qa) - np.log(q_sat)),
        }
    if inputs.optimizer != "sgd":  # closed form (§10.7): c_A r (1 + X*)² = d − c_A
        lam_p = schedule_sums(inputs.schedule, inputs.steps, inputs.warmup, inputs.betas[0])[2]
        x_star = np.sqrt((inputs.in_features - C_A) / (C_A * inputs.rank)) - 1
        den = c["adam_coherence"] * lam_p * np.sqrt(inputs.in_features)
        out["lr_coherent"] = float(max(x_star, 0.0) * sigma / den) if den > 0 else float("inf")
    ranks = np.geomspace(1, inputs.in_features, 241)
    qi, qa = _q_parts(inputs, ranks, inputs.lr, sigma, n, c)
    reg = [_classify(a + b, a, b, q_sat) for a, b in zip(qi, qa, strict=True)]
    out["rank_transitions"] = [
        (float(ranks[i]), reg[i - 1], reg[i]) for i in range(1, len(reg)) if reg[i] != reg[i - 1]
    ]
    return out


def _alpha(rule: str, r: Any, alpha0: float) -> Any:
    """α(r) under an α rule (rank_scaling.ALPHA_RULES): "r", "2r" or "fixed" (= alpha0)."""
    return (
        np.asarray(r, dtype=float) * {"r": 1.0, "2r": 2.0}[rule]
        if rule != "fixed"
        else alpha0 + 0 * np.asarray(r, float)
    )


def local_gamma(inputs: BoundInputs, alpha_rule: str | None = None, *, direction: str = "kl_ref_theta",
                a0_op: float | None = None, contexts_per_step: int = 32, ref_logit_std: float = 0.0,
                constants: dict[str, float] | None = None, rel_step: float = 1e-4) -> float:  # fmt: skip
    """d log KL / d log r of the law at inputs.rank (central difference in continuous r; α from the α rule
    "r", "2r" or "fixed" = inputs.alpha; None infers it from (alpha, rank)). σ is held at its value at inputs."""
    c = CONSTANTS if constants is None else constants
    rule = alpha_rule or (
        "r" if inputs.alpha == inputs.rank else "2r" if inputs.alpha == 2 * inputs.rank else "fixed"
    )
    r = inputs.rank * np.exp(np.array([-rel_step, rel_step]))
    s = lora_scale(inputs.scaling, _alpha(rule, r, inputs.alpha), r)
    part = logit_variance(inputs, r, s, inputs.lr, _sigma(inputs, a0_op), contexts_per_step, c)
    kl = kl_of_q(part["q_inc"] + part["q_aln"], inputs.vocab_size, ref_logit_std / inputs.temperature)
    y = np.log(kl[0] if direction == "kl_ref_theta" else kl[1])
    return float((y[1] - y[0]) / (2 * rel_step))


def law_curve(inputs: BoundInputs, ranks: Any, alpha_rule: str, **kw: Any) -> dict[str, np.ndarray]:
    """predict_kl at each integer rank, α from the α rule (α₀ = inputs.alpha for "fixed")."""
    rows = [
        predict_kl(replace(inputs, rank=int(r), alpha=float(_alpha(alpha_rule, r, inputs.alpha))), **kw)
        for r in ranks
    ]
    return {k: np.array([row[k] for row in rows]) for k in ("kl_ref_theta", "kl_theta_ref", "q", "regime")}
