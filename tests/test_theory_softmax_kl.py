"""Tests of the softmax KL lemma (theory/softmax_kl.md, results L1–L6).

Identities are checked exactly with sympy; inequalities by an adversarial scipy search that must come close to
the bound (tightness) and never pass it (validity); numeric functions against direct numpy evaluation.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import sympy as sp
from scipy.integrate import quad
from scipy.optimize import minimize
from scipy.special import expit

from theory import softmax_kl as sk


def _kl_by_definition(p: np.ndarray, q: np.ndarray) -> float:
    """Σ p log(p/q), straight from the definition."""
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- L1: exact lse forms (sympy)
@pytest.mark.parametrize("n", [2, 3])
def test_lse_form_equals_definition_both_directions(n: int) -> None:
    e = sk.kl_definition_exprs(n)
    for direction in ("ref_theta", "theta_ref"):
        diff = e[f"{direction}_definition"] - e[f"{direction}_lse"]
        assert sp.simplify(sp.expand_log(diff, force=True)) == 0


def test_lse_form_special_cases_symbolic() -> None:
    e = sk.kl_definition_exprs(3)
    _a, z = sk.lse_symbols(3)
    c = sp.Symbol("c", real=True)
    for key in ("ref_theta_lse", "theta_ref_lse"):
        assert sp.simplify(e[key].subs({zi: 0 for zi in z})) == 0  # z = 0 → KL = 0
        assert sp.simplify(e[key].subs({zi: c for zi in z})) == 0  # constant shift → KL = 0


# ---------------------------------------------------------------- L2: variance form
def test_variance_form_second_derivative() -> None:
    v = sk.variance_form_exprs(3)
    t, phi = v["t"], v["phi"]
    assert sp.simplify(phi.subs(t, 0)) == 0
    assert sp.simplify(sp.diff(phi, t).subs(t, 0)) == 0
    assert sp.simplify(sp.diff(phi, t, 2) - v["var"]) == 0


def test_variance_integral_representation_numeric() -> None:
    # KL(p‖q) = ∫₀¹ (1−t) Var_{p_t}(z) dt and KL(q‖p) = ∫₀¹ t Var_{p_t}(z) dt (p_t = softmax(a + t z)).
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, z = rng.normal(size=6) * 2, rng.normal(size=6) * 3

        def var(t: float, a: np.ndarray = a, z: np.ndarray = z) -> float:
            pt = _softmax(a + t * z)
            return float(pt @ z**2 - (pt @ z) ** 2)

        fwd = quad(lambda t, var=var: (1 - t) * var(t), 0, 1, epsabs=1e-13)[0]
        rev = quad(lambda t, var=var: t * var(t), 0, 1, epsabs=1e-13)[0]
        assert sk.kl_ref_theta(a, z) == pytest.approx(fwd, rel=1e-9)
        assert sk.kl_theta_ref(a, z) == pytest.approx(rev, rel=1e-9)


# ---------------------------------------------------------------- numpy KL vs definition, temperature
def test_numeric_kl_matches_definition_and_temperature() -> None:
    rng = np.random.default_rng(1)
    a, z = rng.normal(size=(4, 7)) * 3, rng.normal(size=(4, 7)) * 2
    for tau in (1.0, 0.7, 2.5):
        fwd, rev = sk.kl_ref_theta(a, z, tau), sk.kl_theta_ref(a, z, tau)
        assert fwd.shape == (4,)
        for k in range(4):
            p, q = _softmax(a[k] / tau), _softmax((a[k] + z[k]) / tau)
            assert fwd[k] == pytest.approx(_kl_by_definition(p, q), rel=1e-10)
            assert rev[k] == pytest.approx(_kl_by_definition(q, p), rel=1e-10)
    assert np.all(sk.kl_ref_theta(a, np.zeros_like(a)) == 0)
    assert np.allclose(sk.kl_theta_ref(a, np.full_like(a, 4.2)), 0, atol=1e-13)


# ---------------------------------------------------------------- L3: the sharp bound K(ρ)
def test_two_point_maximiser_and_sharp_value_symbolic() -> None:
    P, rho = sk.P_MASS, sk.RHO
    f = sk.TWO_POINT_KL_EXPR
    assert sp.simplify(sp.diff(f, P).subs(P, sk.P_STAR_EXPR)) == 0  # stationary
    assert (
        sp.simplify(sp.diff(f, P, 2) + (sp.exp(rho) - 1) ** 2 / (1 + P * (sp.exp(rho) - 1)) ** 2) == 0
    )  # concave
    assert sp.simplify(f.subs(P, sk.P_STAR_EXPR) - sk.KL_SHARP_EXPR) == 0
    # K is even and K(ρ) = ρ²/8 − ρ⁴/576 + O(ρ⁶)
    assert sp.simplify(sk.KL_SHARP_EXPR.subs(rho, -rho) - sk.KL_SHARP_EXPR) == 0
    assert sp.series(sk.KL_SHARP_EXPR, rho, 0, 6).removeO() == rho**2 / 8 - rho**4 / 576


def test_sharp_bound_numeric_matches_high_precision() -> None:
    rng = np.random.default_rng(2)
    rhos = np.concatenate(
        [[0.0, 1e-8, 1e-4, 0.05, 0.0999, 0.1, 0.1001, 1.0, 30.0, 700.0], rng.exponential(3, 20)]
    )
    got = sk.kl_sharp_bound(rhos)
    with mpmath.workdps(50):
        f = sp.lambdify(sk.RHO, sk.KL_SHARP_EXPR, "mpmath")
        for r, g in zip(rhos, got, strict=True):
            want = 0.0 if r == 0 else float(f(mpmath.mpf(float(r))))
            assert g == pytest.approx(want, rel=1e-12, abs=1e-300)
    # P* lies in (0, 1) (so the stationary point is admissible)
    ps = sk.p_star(np.array([0.01, 0.5, 3.0, 40.0]))
    assert np.all((ps > 0) & (ps < 1))


def _adversarial_max(ratio_fn, n_params: int, seeds: range, maxiter: int = 3000) -> tuple[float, float]:
    """Maximise ratio_fn over R^n_params from several seeded starts (Nelder–Mead). Returns (best optimum,
    largest ratio seen at ANY evaluated point)."""
    seen = [0.0]

    def obj(x: np.ndarray) -> float:
        r = ratio_fn(x)
        seen[0] = max(seen[0], r)
        return -r

    best = 0.0
    for s in seeds:
        x0 = np.random.default_rng(s).normal(size=n_params) * 2
        res = minimize(
            obj, x0, method="Nelder-Mead", options={"maxiter": maxiter, "xatol": 1e-10, "fatol": 1e-14}
        )
        best = max(best, -res.fun)
    return best, seen[0]


def _unpack(x: np.ndarray, V: int, rho_lo: float = 0.05, rho_hi: float = 20.0):
    """Parameters → (a, z): z_0 = 0, z_1 = ρ ∈ (rho_lo, rho_hi), other z_k inside [0, ρ]; a ∈ (−15, 15)."""
    rho = rho_lo + (rho_hi - rho_lo) * expit(x[0])
    inner = rho * expit(x[1 : V - 1])
    z = np.concatenate([[0.0, rho], inner])
    a = 15 * np.tanh(x[V - 1 :])
    return a, z, rho


@pytest.mark.parametrize("direction", ["ref_theta", "theta_ref"])
def test_sharp_bound_adversarial(direction: str) -> None:
    kl = sk.kl_ref_theta if direction == "ref_theta" else sk.kl_theta_ref
    V = 4

    def ratio(x: np.ndarray) -> float:
        a, z, rho = _unpack(x, V)
        return float(kl(a, z) / sk.kl_sharp_bound(rho))

    best, seen = _adversarial_max(ratio, 1 + (V - 2) + V, range(4))
    assert best >= 0.999  # K(ρ) is approached (it is the supremum)
    assert seen <= 1 + 1e-9  # and never exceeded


@pytest.mark.parametrize("direction", ["ref_theta", "theta_ref"])
def test_range_sq_over_8_adversarial(direction: str) -> None:
    kl = sk.kl_ref_theta if direction == "ref_theta" else sk.kl_theta_ref
    V = 3

    def ratio(x: np.ndarray) -> float:
        a, z, rho = _unpack(x, V)
        return float(kl(a, z) / (rho**2 / 8))

    best, seen = _adversarial_max(ratio, 1 + (V - 2) + V, range(4))
    assert best >= 0.99  # two-point distributions with small range approach ρ²/8
    assert seen <= 1 + 1e-9


def test_bound_chain_on_random_shifts() -> None:
    # K ≤ ρ²/8 ≤ ‖z − z̄‖²/4 ≤ ‖z‖²/4 and KL ≤ K, for random logits and shifts at several temperatures.
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2000, 9)) * rng.exponential(2, size=(2000, 1))
    z = rng.normal(size=(2000, 9)) * rng.exponential(2, size=(2000, 1)) + rng.normal(size=(2000, 1))
    for tau in (0.5, 1.0, 3.0):
        b = sk.kl_bounds(z, tau)
        kls = np.maximum(sk.kl_ref_theta(a, z, tau), sk.kl_theta_ref(a, z, tau))
        assert np.all(kls <= b["sharp"] * (1 + 1e-9) + 1e-15)
        assert np.all(b["sharp"] <= b["range_sq_over_8"] * (1 + 1e-12))
        assert np.all(b["range_sq_over_8"] <= b["centred_l2_sq_over_4"] * (1 + 1e-12))
        assert np.all(b["centred_l2_sq_over_4"] <= b["l2_sq_over_4"] * (1 + 1e-12))
        # temperature divides the shift: KL(a, z, τ) = KL(a/τ, z/τ, 1)
        assert np.allclose(
            sk.kl_ref_theta(a, z, tau), sk.kl_ref_theta(a / tau, z / tau), rtol=1e-10, atol=1e-14
        )


def test_centred_l2_tight_for_antipodal_pair() -> None:
    # z = (u, −u): range² = 4u², ‖z − z̄‖² = 2u², so ρ²/8 = ‖z − z̄‖²/4 = u²/2.
    b = sk.kl_bounds(np.array([1.5, -1.5]))
    assert b["range_sq_over_8"] == pytest.approx(1.5**2 / 2)
    assert b["centred_l2_sq_over_4"] == pytest.approx(1.5**2 / 2)


# ---------------------------------------------------------------- L6: log-prob change ≤ range
def test_logprob_change_bounded_by_range_adversarial() -> None:
    V = 3

    def ratio(x: np.ndarray) -> float:
        a, z, rho = _unpack(x, V, rho_lo=0.1, rho_hi=10.0)
        return float(np.max(np.abs(sk.logprob_change(a, z))) / rho)

    best, seen = _adversarial_max(ratio, 1 + (V - 2) + V, range(3))
    assert best >= 0.99  # approached when the token with the top shift has p_y → 0
    assert seen <= 1 + 1e-9
