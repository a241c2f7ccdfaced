"""Rank-scaling predictions (theory/rank_scaling.py): symbolic exponents, A₀ moments, γ fit, regimes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import sympy as sp

from theory.apriori import D_IN, RANK
from theory.rank_scaling import (
    MOMENT_AG_EXPR,
    MOMENT_MG_EXPR,
    alpha_for,
    derive_gamma,
    fit_gamma,
    hyperparameter_check,
    kl_leading_expr,
    local_exponent,
    predict_gamma,
    snr_from_coherence,
)

# σ_s = d log s / d log r, written out per scaling × α rule (s = α/r, α/√r, α; α = 2r or fixed)
SIGMA_S = {
    ("alpha/r", "2r"): 0,
    ("alpha/r", "r"): 0,
    ("alpha/r", "fixed"): -1,
    ("rslora", "2r"): sp.Rational(1, 2),
    ("rslora", "r"): sp.Rational(1, 2),
    ("rslora", "fixed"): -sp.Rational(1, 2),
    ("const", "2r"): 1,
    ("const", "r"): 1,
    ("const", "fixed"): 0,
}
# KL ∝ s^q · r^m for r << d (theory/rank_scaling.md §3): z ∝ s²·ḡᵀMx (SGD), s·(direction of A₀g) (clipped),
# s·A₀ᵀφ (Adam)
Q_M = {("sgd", "inactive"): (4, 1), ("sgd", "active"): (2, 0), ("adamw", "inactive"): (2, 1)}


@pytest.mark.parametrize(("opt", "clip", "scaling", "rule"), [k + s for k in Q_M for s in SIGMA_S])
def test_derived_exponent_equals_hand_table(opt, clip, scaling, rule):
    q, m = Q_M[(opt, clip)]
    expected = q * SIGMA_S[(scaling, rule)] + m
    assert sp.simplify(derive_gamma(opt, scaling, rule, clip) - expected) == 0
    # the mean-field linearisation A₀ᵀA₀ → E[A₀ᵀA₀] = (r/3d) I predicts one more power of r (§4)
    assert sp.simplify(derive_gamma(opt, scaling, rule, clip, mean_field=True) - (expected + 1)) == 0
    assert predict_gamma(opt, scaling, rule, clip).gamma == pytest.approx(float(expected))


def test_adam_and_adamw_predict_the_same_exponent():
    for scaling, rule in SIGMA_S:
        assert predict_gamma("adam", scaling, rule).gamma == predict_gamma("adamw", scaling, rule).gamma


def test_local_exponent_of_sgd_at_finite_d_by_hand():
    # E ∝ s⁴ r (r + d − 1/5) with s = 2 constant: γ(r) = 1 + r/(r + d − 1/5)
    got = local_exponent(kl_leading_expr("sgd", "alpha/r", "2r"))
    assert sp.simplify(got - (1 + RANK / (RANK + D_IN - sp.Rational(1, 5)))) == 0


def test_a0_second_moments_match_monte_carlo():
    # M2: E‖A₀ᵀA₀g‖² = σ⁴‖g‖² r(r + d − 1/5) and E‖A₀g‖² = σ²‖g‖² r for A₀ iid U[−1/√d, 1/√d], σ² = 1/(3d)
    rng = np.random.default_rng(0)
    d, r, n = 6, 3, 400_000
    g = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    A = rng.uniform(-1 / np.sqrt(d), 1 / np.sqrt(d), size=(n, r, d))
    Ag = A @ g  # (n, r)
    mg = np.einsum("nrd,nr->nd", A, Ag)  # A₀ᵀA₀g
    sub = {RANK: r, D_IN: d}
    gg = float(g @ g)
    mc_mg, mc_ag = np.mean(np.sum(mg**2, -1)), np.mean(np.sum(Ag**2, -1))
    assert mc_mg == pytest.approx(float(MOMENT_MG_EXPR.subs(sub)) * gg, rel=0.01)
    assert mc_ag == pytest.approx(float(MOMENT_AG_EXPR.subs(sub)) * gg, rel=0.01)
    # and the fluctuation term matters: the mean-field value (rσ²)²‖g‖² is (r + d − 1/5)/r ≈ 3x smaller here
    assert mc_mg > 2.5 * (r / (3 * d)) ** 2 * gg


def test_fit_recovers_a_known_exponent_from_synthetic_power_law():
    rng = np.random.default_rng(1)
    ranks = np.array([1, 2, 4, 8, 16, 32])
    gamma, sigma = -1.7, 0.4
    noise = rng.lognormal(-(sigma**2) / 2, sigma, size=(30, ranks.size))  # E[noise] = 1
    fit = fit_gamma(ranks, 3e-4 * ranks**gamma * noise, n_boot=2000, seed=0)
    assert fit.lo <= gamma <= fit.hi
    assert fit.half_width < 0.1
    exact = fit_gamma(ranks, 2.0 * ranks**0.75 * np.ones((5, 1)), n_boot=1000)
    assert exact.gamma == pytest.approx(0.75, abs=1e-12) and exact.half_width == pytest.approx(0, abs=1e-12)


def test_fit_is_seeded():
    y = np.random.default_rng(2).lognormal(size=(8, 3))
    assert fit_gamma([1, 2, 4], y, seed=3) == fit_gamma([1, 2, 4], y, seed=3)


def test_snr_from_coherence_inverts_the_coherence_formula():
    for rho, T in itertools.product([0.3, 1.0, 4.0], [2, 10, 50]):
        c = np.sqrt((T**2 * rho**2 + T) / (T**2 * (1 + rho**2)))
        assert snr_from_coherence(c, T) == pytest.approx(rho, rel=1e-9)
    assert snr_from_coherence(1.0, 1) == 0.0


def _diag(**kw):
    base = dict(d=256, r_max=32, vocab_size=2, w0_scale=0.0, max_range=0.01, max_drift=0.001,
                clip_fraction_min=0.0, clip_fraction_max=0.0, min_coherence=0.3, min_grad_norm=1e-2,
                steps=12, eta_T=3e-4, weight_decay=0.01)  # fmt: skip
    return base | kw


def test_regime_checks_accept_the_design_and_reject_violations():
    check = predict_gamma("sgd", "alpha/r", "2r").check
    assert check(_diag()).ok
    bad = check(_diag(max_range=0.5, r_max=64))
    assert not bad.ok and sum("FAILS" in line for line in bad.lines) == 2
    adam = predict_gamma("adamw", "rslora", "fixed").check
    assert adam(_diag()).ok and not adam(_diag(eta_T=1e-2)).ok  # ηT√(3·256·32) = 1.6 > 0.1
    clipped = predict_gamma("sgd", "const", "2r", clip="active").check
    assert clipped(_diag(clip_fraction_min=1.0, clip_fraction_max=1.0, steps=2)).ok
    # T = 12 at coherence 0.6: ρ̂² = (0.36·12 − 1)/(12·0.64) ≈ 0.43, (T−1)ρ̂² ≈ 4.8 and ρ̂ < 3: neither limit
    assert not clipped(_diag(clip_fraction_min=1.0, clip_fraction_max=1.0, min_coherence=0.6)).ok


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("rmsprop", "alpha/r", "2r"), "optimizer must be one of"),
        (("sgd", "alpha", "2r"), r"scaling must be one of \('alpha/r', 'rslora', 'const'\)"),
        (("sgd", "alpha/r", "3r"), r"alpha_rule must be one of \('r', '2r', 'fixed'\)"),
    ],
)
def test_bad_input_names_accepted_values(args, match):
    with pytest.raises(ValueError, match=match):
        predict_gamma(*args)


def test_bad_clip_regime_rank_and_fit_input():
    with pytest.raises(ValueError, match=r"clip must be one of \('inactive', 'active'\)"):
        predict_gamma("sgd", "alpha/r", "2r", clip="sometimes")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        alpha_for("2r", 0)
    with pytest.raises(ValueError, match="n_boot must be >= 1000"):
        fit_gamma([1, 2], np.ones((5, 2)), n_boot=10)
    with pytest.raises(ValueError, match="shape"):
        fit_gamma([1, 2, 4], np.ones((5, 2)))


def test_hyperparameter_check_is_the_full_checks_hyperparameter_lines():
    diag = dict(d=128.0, r_max=32.0, eta_T=0.024, weight_decay=0.0, max_range=0.1, max_drift=0.01)
    full = predict_gamma("adamw", "alpha/r", "2r", measure="mean").check(diag).lines
    part = hyperparameter_check("adamw", diag)
    assert set(part.lines) <= set(full) and len(part.lines) == 3
    # by hand: r/d = 0.25 > 1/8; 0.024 * sqrt(3 * 128 * 32) = 2.66 > 0.1; 0.024 * 0 = 0 <= 0.01
    assert [line.endswith("FAILS") for line in part.lines] == [True, True, False] and not part.ok
    with pytest.raises(ValueError, match="Adam"):
        hyperparameter_check("sgd", diag)
