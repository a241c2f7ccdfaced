"""theory.credit_degeneracy: closed forms (sympy), extremal configurations (brute force + adversarial search),
the corrected ARCA Prop. 1 with a counterexample to its stated form, Prop. 2 rates, sharpening, regimes.

Derivations are in theory/credit_degeneracy.md; each test names the section it checks.
"""

import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from scipy.optimize import differential_evolution

from theory import aposteriori
from theory import credit_degeneracy as cd

REPO = Path(__file__).resolve().parents[1]
CF = cd.closed_forms()
k, T, rho, x, S, eps, p, delta, z = sp.symbols("k T rho x S eps p delta z", positive=True)


def l1(w, w2):
    return np.abs(np.asarray(w) - np.asarray(w2)).sum(axis=-1)


def maximise(f, bounds, seed=0, maxiter=300):
    """Adversarial search (differential evolution): max of a vectorised f(X), X of shape (n, dim)."""
    res = differential_evolution(
        lambda X: -f(X.T),
        bounds,
        seed=seed,
        vectorized=True,
        updating="deferred",
        maxiter=maxiter,
        tol=1e-12,
        polish=False,
    )
    return -res.fun


# ------------------------------------------------------------------ the normalisation and diagnostics


def test_weights_hand_values_and_fallback():
    # p = 1, ε = 0.5: (1.5, 3.5, 0.5) / 5.5; negative scores are clamped to 0 first.
    np.testing.assert_allclose(cd.weights([1.0, 3.0, -2.0], eps=0.5), [1.5 / 5.5, 3.5 / 5.5, 0.5 / 5.5])
    # p = 2, ε = 0.5: (2.25, 12.25, 0.25) / 14.75
    np.testing.assert_allclose(
        cd.weights([1.0, 3.0, 0.0], eps=0.5, p=2), np.array([2.25, 12.25, 0.25]) / 14.75
    )
    # p = 2, ε = 1e-8: scores 1e-5 and 0 give S = (1e-5 + 1e-8)² + 1e-16 ≈ 1.0e-10 ≤ ε, so uniform (§3),
    # although the score ratio is 1000.
    np.testing.assert_array_equal(cd.weights([1e-5, 0.0], p=2), [0.5, 0.5])
    # p = 1 never falls back for T ≥ 2 (S ≥ 2ε > ε): the same scores give (1e-5 + 1e-8, 1e-8)/(1e-5 + 2e-8).
    np.testing.assert_allclose(cd.weights([1e-5, 0.0]), np.array([1.001e-5, 1e-8]) / 1.002e-5, rtol=1e-12)


def test_weights_match_the_lab_normalisation():
    torch = pytest.importorskip("torch")
    credit = pytest.importorskip("arca_lab.credit")
    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [rng.exponential(1.0, (4, 7)), rng.uniform(0, 1e-5, (2, 7))]
    )  # last rows fall back
    mask = torch.ones(scores.shape, dtype=torch.bool)
    for p_ in (1.0, 2.0):
        lab = credit.normalize_scores(torch.tensor(scores), mask, sharpening=p_, eps=1e-8).double().numpy()
        np.testing.assert_allclose(cd.weights(scores, p=p_), lab, rtol=1e-5, atol=1e-7)


def test_gini_etr_special_cases_and_mean_difference_form():
    n = 6
    assert cd.gini(np.full(n, 1 / n)) == pytest.approx(0.0, abs=1e-15)
    assert cd.etr(np.full(n, 1 / n)) == pytest.approx(1.0)
    one_hot = np.eye(n)[2]
    assert cd.gini(one_hot) == pytest.approx((n - 1) / n)
    assert cd.etr(one_hot) == pytest.approx(1 / n)
    # Hand value: w = (0.1, 0.2, 0.3, 0.4), coefficients 2i − 5 = (−3, −1, 1, 3): G = 1.0 / 4 = 0.25;
    # ETR = 1 / (4 · 0.30) = 5/6.
    assert cd.gini([0.4, 0.1, 0.3, 0.2]) == pytest.approx(0.25)
    assert cd.etr([0.4, 0.1, 0.3, 0.2]) == pytest.approx(5 / 6)
    # The sorted form equals the mean-difference form Σ_ij |v_i − v_j| / (2n Σ v) used in the proofs (§2).
    v = np.random.default_rng(1).exponential(size=(50, 9))
    md = np.abs(v[:, :, None] - v[:, None, :]).sum(axis=(1, 2)) / (2 * 9 * v.sum(axis=1))
    np.testing.assert_allclose(cd.gini(v), md, rtol=1e-12)


# ------------------------------------------------------------------ §2 closed forms (sympy)


def test_sympy_two_level_gini_and_etr_from_the_definitions():
    i = sp.symbols("i", integer=True, positive=True)
    # Ascending sort: T − k entries 1, then k entries ρ; the sorted-sum Gini definition, summed symbolically.
    num = sp.summation(2 * i - T - 1, (i, 1, T - k)) + rho * sp.summation(2 * i - T - 1, (i, T - k + 1, T))
    gini_derived = num / (T * (k * rho + T - k))
    assert sp.simplify(gini_derived - CF["gini_two_level"]) == 0
    # ‖w − u‖₁: k entries ρ/s above 1/T and T − k entries 1/s below, s = kρ + T − k.
    s = k * rho + T - k
    l1_derived = k * (rho / s - 1 / T) + (T - k) * (1 / T - 1 / s)
    assert sp.simplify(l1_derived - CF["l1_two_level"]) == 0
    etr_derived = s**2 / (T * (k * rho**2 + (T - k) * 1))
    assert sp.simplify(etr_derived - CF["etr_two_level"]) == 0
    # Special cases: ρ = 1 is uniform; k = 1, ρ → ∞ is one-hot.
    assert sp.simplify(CF["gini_two_level"].subs(rho, 1)) == 0
    assert sp.limit(CF["gini_two_level"].subs(k, 1), rho, sp.oo) == (T - 1) / T
    assert sp.limit(CF["etr_two_level"].subs(k, 1), rho, sp.oo) == 1 / T


def test_sympy_extremal_fractions_and_envelopes():
    g = CF["gini_two_level"].subs(k, x * T)
    roots = [r for r in sp.solve(sp.diff(g, x), x) if sp.simplify(r.subs(rho, 4)) > 0]
    assert len(roots) == 1 and sp.simplify(roots[0] - CF["gini_argmax_x"]) == 0
    assert sp.simplify(g.subs(x, CF["gini_argmax_x"]) - CF["gini_envelope"]) == 0
    e = CF["etr_two_level"].subs(k, x * T)
    roots = [r for r in sp.solve(sp.diff(e, x), x) if sp.simplify(r.subs(rho, 4)) > 0]  # drops −1/(ρ − 1)
    assert len(roots) == 1 and sp.simplify(roots[0] - CF["etr_argmin_x"]) == 0
    assert sp.simplify(e.subs(x, CF["etr_argmin_x"]) - CF["etr_envelope"]) == 0
    # Prop. 2 chain (§4): 2(√ρ − 1)/(√ρ + 1) = 2(ρ − 1)/(√ρ + 1)², then ≤ (ρ − 1)/2 since √ρ + 1 ≥ 2.
    assert sp.simplify(2 * CF["gini_envelope"] - 2 * (rho - 1) / (sp.sqrt(rho) + 1) ** 2) == 0
    # Prop. 2 rate ≈ p z / 2 as z = √2·Lβ/ε → 0.
    assert sp.simplify(sp.series(CF["prop2_rate"], z, 0, 2).removeO() - p * z / 2) == 0


def test_sympy_sum_form_and_prop1_decomposition():
    c = eps**p  # the floor value of (0 + ε)^p
    big = S - (T - 1) * c  # one big entry, the rest at the floor (the extremal vertex of §3)
    l1_derived = (big / S - 1 / T) + (T - 1) * (1 / T - c / S)
    assert sp.simplify(l1_derived - CF["l1_sum_form"]) == 0
    # §5 decomposition: a/S − b/S_b = (a − b)/S_b + a (S_b − S_a)/(S_a S_b).
    a, b, Sa, Sb = sp.symbols("a b S_a S_b", positive=True)
    assert sp.simplify(a / Sa - b / Sb - ((a - b) / Sb + a * (Sb - Sa) / (Sa * Sb))) == 0
    # Stated form vs corrected at the paper's δ = 2Lβ: they differ by exactly the factor T (when ε = 0); with
    # the proved δ = √2·Lβ (aposteriori.md P4) by T/√2.
    corrected = CF["prop1_p1"].subs({delta: CF["prop2_stated"], eps: 0})
    assert sp.simplify(corrected / CF["prop1_stated"] - T) == 0
    proved = CF["prop1_p1"].subs({delta: CF["logprob_shift"], eps: 0})
    assert sp.simplify(proved / CF["prop1_stated"] - T / sp.sqrt(2)) == 0


def test_numpy_matches_lambdified_closed_forms():
    rng = np.random.default_rng(2)
    Tn = rng.integers(2, 40, 200)
    kn = np.array([rng.integers(1, t) for t in Tn])
    rn = np.exp(rng.uniform(0, 8, 200))
    args = (kn, Tn, rn)
    for name, fn in [("gini_two_level", cd.two_level_gini), ("etr_two_level", cd.two_level_etr)]:
        ref = sp.lambdify((k, T, rho), CF[name], "numpy")(*args)
        np.testing.assert_allclose(fn(kn, rn, Tn), ref, rtol=1e-9)
    np.testing.assert_allclose(cd.gini_envelope(rn), sp.lambdify(rho, CF["gini_envelope"])(rn), rtol=1e-9)
    np.testing.assert_allclose(cd.etr_envelope(rn), sp.lambdify(rho, CF["etr_envelope"])(rn), rtol=1e-9)
    np.testing.assert_allclose(cd.max_weight_bound(rn, Tn), rn / (rn + Tn - 1), rtol=1e-12)


# ------------------------------------------------------------------ §2 extremality


@pytest.mark.parametrize(("r", "n"), [(3.0, 5), (50.0, 7), (1.2, 9), (1e4, 6), (2.0, 1)])
def test_intervals_equal_the_best_vertex(r, n):
    """Quasiconvexity (§2): the extremes over [1, ρ]^T sit at vertices; enumerate all 2^T of them."""
    V = np.array(list(itertools.product([1.0, r], repeat=n)))  # (2^T, T)
    W = V / V.sum(axis=1, keepdims=True)
    assert cd.gini_interval(r, n)[1] == pytest.approx(cd.gini(W).max(), rel=1e-12, abs=1e-15)
    assert cd.etr_interval(r, n)[0] == pytest.approx(cd.etr(W).min(), rel=1e-12)
    assert cd.l1_ratio_bound(r, n) == pytest.approx(l1(W, 1 / n).max(), rel=1e-12, abs=1e-15)
    assert cd.max_weight_bound(r, n) == pytest.approx(W.max(), rel=1e-12)


@pytest.mark.parametrize(("r", "n"), [(4.0, 5), (300.0, 6)])
def test_adversarial_search_never_beats_the_intervals(r, n):
    box = [(1.0, r)] * n
    norm = lambda V: V / V.sum(axis=-1, keepdims=True)  # noqa: E731
    checks = [
        (lambda V: cd.gini(norm(V)) / cd.gini_interval(r, n)[1]),
        (lambda V: cd.etr_interval(r, n)[0] / cd.etr(norm(V))),
        (lambda V: l1(norm(V), 1 / n) / cd.l1_ratio_bound(r, n)),
    ]
    for f in checks:
        best = maximise(f, box)
        assert 0.9 <= best <= 1 + 1e-9


def test_envelopes_bound_every_T_and_invert():
    r = np.array([1.0, 1.5, 4.0, 30.0, 1e6])
    for n in (2, 3, 10, 257, 10_000):
        assert np.all(cd.gini_interval(r, n)[1] <= cd.gini_envelope(r) + 1e-15)
        assert np.all(cd.etr_interval(r, n)[0] >= cd.etr_envelope(r) - 1e-15)
    # T → ∞: the discrete extremes approach the envelopes.
    np.testing.assert_allclose(cd.gini_interval(r, 10**7)[1], cd.gini_envelope(r), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(cd.etr_interval(r, 10**7)[0], cd.etr_envelope(r), rtol=1e-5)
    G = np.array([0.0, 0.353, 0.941])
    np.testing.assert_allclose(cd.gini_envelope(cd.min_ratio_for_gini(G)), G, atol=1e-12)
    E = np.array([1.0, 0.467, 0.052])
    np.testing.assert_allclose(cd.etr_envelope(cd.min_ratio_for_etr(E)), E, rtol=1e-12)
    # Hand value: G = 0.5 needs ρ ≥ (1.5/0.5)² = 9; ETR = 0.64 needs ρ ≥ ((1 + 0.6)/0.8)² = 4.
    assert cd.min_ratio_for_gini(0.5) == pytest.approx(9.0)
    assert cd.min_ratio_for_etr(0.64) == pytest.approx(4.0)


def test_random_scores_fall_inside_the_predicted_intervals():
    rng = np.random.default_rng(3)
    for p_ in (1.0, 2.0):
        for a, b in [(0.0, 1e-8), (0.5, 2.0), (0.0, 3.0), (1.0, 1.1)]:
            n = 17
            draws = [
                rng.uniform(a, b, (300, n)),
                a + (b - a) * rng.beta(0.1, 0.1, (300, n)),  # mass near both ends: near-extremal vectors
                np.where(rng.random((300, n)) < 0.2, b, a),  # exact two-level vectors
            ]
            pred = cd.predict_regime(a, b, n, p=p_)
            for s in draws:
                w = cd.weights(s, p=p_)
                g, e = cd.gini(w), cd.etr(w)
                assert np.all((g >= pred["gini"][0] - 1e-12) & (g <= pred["gini"][1] + 1e-9))
                assert np.all((e >= pred["etr"][0] - 1e-9) & (e <= pred["etr"][1] + 1e-12))
                assert np.all(l1(w, 1 / n) <= pred["l1_to_uniform_max"] + 1e-9)
                assert np.all(w.max(axis=-1) <= pred["max_weight"] + 1e-12)
                # Pietra index ≤ Gini (§2): ‖w − u‖₁ ≤ 2G, with equality on two-level vectors.
                assert np.all(l1(w, 1 / n) <= 2 * g + 1e-12)


# ------------------------------------------------------------------ §3 the sum form


def test_sum_form_is_tight_and_never_beaten():
    n, e_, p_ = 5, 0.1, 2.0
    # Hand value: S = 1, ε^p = 0.01: 2(1 − 1/5)(1 − 5·0.01/1) = 1.6 · 0.95 = 1.52.
    assert cd.l1_to_uniform_bound(1.0, n, e_, p_) == pytest.approx(1.52)

    def ratio(A):  # A: (..., T) scores in [0, 3]
        bound = cd.l1_to_uniform_bound(((A + e_) ** p_).sum(-1), n, e_, p_)
        realised = l1(cd.weights(A, e_, p_), 1 / n)
        assert np.all(realised[bound == 0] == 0)  # fallback rows (S ≤ ε) are exactly uniform
        return np.where(bound > 0, realised / np.where(bound > 0, bound, 1.0), 0.0)

    assert 0.9 <= maximise(ratio, [(0.0, 3.0)] * n) <= 1 + 1e-9
    # p = 2, ε = 1e-8: any S ≤ ε means the fallback, so the bound is exactly 0 (and the weights uniform).
    assert cd.l1_to_uniform_bound(5e-9, 2, 1e-8, 2.0) == 0.0
    assert cd.l1_to_uniform_bound(2e-8, 2, 1e-8, 2.0) == pytest.approx(1 - 1e-8)  # 2·½·(1 − 2e-16/2e-8)


# ------------------------------------------------------------------ §4 ARCA paper Prop. 2


def test_logprob_shift_is_at_most_sqrt2_L_beta():
    rng = np.random.default_rng(4)
    d, V = 8, 30
    for _ in range(200):
        W = rng.normal(size=(V, d))
        L = np.linalg.norm(W, 2)
        h, dh = rng.normal(size=d), rng.normal(size=d)
        beta = np.linalg.norm(dh)
        logp = lambda zz: zz - np.log(np.exp(zz - zz.max()).sum()) - zz.max()  # noqa: E731
        shift = np.abs(logp(W @ (h + dh)) - logp(W @ h)).max()
        assert shift <= cd.logprob_shift_bound(L, beta) + 1e-12
        assert cd.logprob_shift_bound(L, beta) < cd.prop2_stated(L, beta)  # the paper's 2Lβ is looser


def test_logprob_shift_constant_is_the_proved_sqrt2_and_sharp():
    """§4 uses aposteriori.md P4's √2·Lβ, not the paper's 2Lβ: it is attained in the limit, so 2Lβ is loose.

    P4's worst case: V = d = 2, W = L·I, Δh = β(1, −1)/√2, h = (−M, 0), y = token 0 (p_ref(y) → 0 as M → ∞).
    """
    L, beta, M = sp.symbols("L beta M", positive=True)
    a = L * beta / sp.sqrt(2)  # Δz = (a, −a), z = (−LM, 0)
    shift = a - (sp.log(sp.exp(-L * M + a) + sp.exp(-a)) - sp.log(sp.exp(-L * M) + 1))  # Δ log softmax_0
    assert sp.simplify(sp.limit(shift, M, sp.oo) - CF["logprob_shift"]) == 0
    assert sp.simplify(CF["prop2_stated"] / CF["logprob_shift"] - sp.sqrt(2)) == 0
    # numerically: the bound function is √2·Lβ, the family reaches ≥ 0.999 of it and never exceeds it
    Lv, bv = 1.7, 0.3
    f = sp.lambdify(M, shift.subs({L: Lv, beta: bv}), "mpmath")
    values = [float(f(m)) for m in (1.0, 5.0, 20.0)]
    assert cd.logprob_shift_bound(Lv, bv) == pytest.approx(np.sqrt(2) * Lv * bv, rel=1e-15)
    assert values == sorted(values) and values[-1] >= 0.999 * cd.logprob_shift_bound(Lv, bv)
    assert max(values) <= cd.logprob_shift_bound(Lv, bv)
    assert cd.prop2_stated(Lv, bv) == pytest.approx(2 * Lv * bv)
    # the same constant as the lab's credit-link check (aposteriori.credit_link_bound "op_bound", τ = 1)
    W, dh = Lv * np.eye(2), bv * np.array([[1.0, -1.0]]) / np.sqrt(2)
    link = aposteriori.credit_link_bound(W, dh, [values[-1]])
    assert link["op_bound"][0] == pytest.approx(float(cd.logprob_shift_bound(Lv, bv)), rel=1e-12)
    assert link["prop2_bound"][0] == pytest.approx(float(cd.prop2_stated(Lv, bv)), rel=1e-12)


def test_prop2_chain_fallback_and_limit():
    n = 64
    zs = np.array([1e-3, 0.1, 1.0, 10.0, 1e4])
    for p_ in (1.0, 2.0, 3.0):
        exact = cd.prop2_l1_bound(zs * 1e-8 / np.sqrt(2), n, 1e-8, p_)  # L·β = z ε / √2
        rho_ = (1 + zs) ** p_
        assert np.all(exact <= 2 * cd.gini_envelope(rho_) + 1e-15)
        assert np.all(2 * cd.gini_envelope(rho_) <= cd.prop2_rate(zs * 1e-8 / np.sqrt(2), 1e-8, p_) + 1e-15)
    # Hand value, p = 1, z = √2·Lβ/ε = 0.1: rate = 0.05.
    assert cd.prop2_rate(0.1e-8 / np.sqrt(2), 1e-8, 1.0) == pytest.approx(0.05)
    # p = 2, T = 64: fallback for √2·Lβ ≤ √(ε/64) − ε ≈ 1.249e-5, i.e. Lβ ≤ 8.83e-6: exactly uniform credit.
    assert cd.prop2_l1_bound(0.85e-5, n, p=2.0) == 0.0
    assert cd.prop2_l1_bound(0.9e-5, n, p=2.0) > 1.9  # just above: nearly unconstrained
    # β → 0 with fixed ε: random divergence scores in [0, √2·Lβ] approach uniform within the bound.
    rng = np.random.default_rng(5)
    for Lb in (1e-6, 1e-9, 1e-11):
        s = rng.uniform(0, np.sqrt(2) * Lb, (500, n))
        assert np.all(l1(cd.weights(s), 1 / n) <= cd.prop2_l1_bound(Lb, n) + 1e-12)
    assert cd.prop2_l1_bound(1e-11, n) < 3e-3


# ------------------------------------------------------------------ §5 ARCA paper Prop. 1


def test_prop1_counterexample_to_the_stated_form():
    """A model satisfying Prop. 1's hypotheses whose surprisal weights move 1.9× further than 4Lβ/Σα^ref.

    Vocabulary {0, 1}, hidden size 1, W_lm = [[1], [0]] so L = ‖W_lm‖_op = 1 and logits z = (h, 0). Every
    sampled token is y = 0, so the surprisal is α = −log σ(h) = log(1 + e^{−h}). Base: h = 0 at all T = 16
    positions, α^ref = log 2. Adapter: Δh = +β at 8 positions and −β at 8, β = 0.5, so max_t ‖Δh_t‖ = β.
    """
    n, beta, L = 16, 0.5, 1.0
    dh = np.array([beta] * 8 + [-beta] * 8)
    alpha_ref = np.full(n, np.log(2.0))
    alpha = np.log1p(np.exp(-(0.0 + dh)))  # softplus(−h)
    # By hand: α = log(1 + e^{∓0.5}) = 0.474077 / 0.974077 (they differ by exactly 0.5). w^ref is uniform and
    # w = α / Σα, so ‖w − w^ref‖₁ = (0.974077 − 0.474077) / (0.974077 + 0.474077) = 0.5 / 1.448154 = 0.345267.
    realised = l1(cd.weights(alpha), cd.weights(alpha_ref))
    assert realised == pytest.approx(0.5 / (np.log1p(np.exp(-0.5)) + np.log1p(np.exp(0.5))), rel=1e-6)
    assert realised == pytest.approx(0.345267, abs=1e-6)
    # Stated: 4 L β / Σ α^ref = 2 / (16 log 2) = 0.180337 < 0.345: the stated bound fails.
    stated = cd.prop1_stated(L, beta, alpha_ref.sum())
    assert stated == pytest.approx(2 / (16 * np.log(2)))
    assert realised > 1.9 * stated
    # Hypotheses hold: |Δα_t| ≤ √2·Lβ = 0.707 (here 0.281 at most), and so do the corrected bounds.
    dmax = np.abs(alpha - alpha_ref).max()
    assert dmax <= cd.logprob_shift_bound(L, beta)
    assert realised <= cd.prop1_sup(alpha_ref, dmax) + 1e-12
    assert cd.prop1_sup(alpha_ref, dmax) <= cd.prop1_bound(alpha_ref, dmax) + 1e-12
    assert cd.prop1_bound(alpha_ref, dmax) <= cd.prop1_bound_p1(n, dmax, alpha_ref.sum()) + 1e-12
    # 2Tδ/Σα^ref = 32 · 0.280930 / 11.0904 = 0.8106 ≥ 0.345.
    assert cd.prop1_bound_p1(n, dmax, alpha_ref.sum()) == pytest.approx(0.8106, abs=1e-4)


def test_prop1_factor_T_cannot_be_dropped():
    """α^ref = (B, 0, …, 0), α = (B − δ, δ, …, δ): ‖w − w^ref‖₁ → 2(T−1)δ/(B + (T−2)δ) (ε → 0), which is
    (T − 1)/T of the corrected 2Tδ/B up to O(δ/B), and T − 1 times the stated form's 2δ/B."""
    B, d_ = 10.0, 1e-4
    for n in (3, 12, 100):
        ref = np.r_[B, np.zeros(n - 1)]
        alpha = np.r_[B - d_, np.full(n - 1, d_)]
        realised = l1(cd.weights(alpha), cd.weights(ref))
        assert realised == pytest.approx(2 * (n - 1) * d_ / (B + (n - 2) * d_), rel=1e-5)
        corrected = cd.prop1_bound_p1(n, d_, B)
        assert (n - 1) / n * 0.99 <= realised / corrected <= 1
        assert realised / (2 * d_ / B) == pytest.approx(n - 1, rel=1e-2)


def test_prop1_sup_matches_vertex_enumeration_and_closed_forms():
    rng = np.random.default_rng(6)
    n = 5
    for p_ in (0.5, 1.0, 2.0):
        for _ in range(4):
            ref, d_ = rng.uniform(0, 2, n), rng.uniform(0, 1)
            # Every vertex of the α box (each α_t at its lowest or highest reachable value).
            lo, hi = np.maximum(ref - d_, 0), ref + d_
            A = np.array([np.where(np.array(s) > 0, hi, lo) for s in itertools.product([0, 1], repeat=n)])
            best = l1(cd.weights(A, p=p_), cd.weights(ref, p=p_)).max()
            assert cd.prop1_sup(ref, d_, p=p_) == pytest.approx(best, rel=1e-10)
            assert cd.prop1_sup(ref, d_, p=p_) <= cd.prop1_bound(ref, d_, p=p_) + 1e-12
        ref = rng.uniform(0, 2, (3, n))
        if p_ == 1.0:  # p = 1: Σ_t D_t ≤ Tδ, equality when every α^ref_t ≥ δ
            np.testing.assert_allclose(
                cd.prop1_bound(ref + 0.3, 0.3), cd.prop1_bound_p1(n, 0.3, ref.sum(-1) + n * 0.3)
            )
            assert np.all(cd.prop1_bound(ref, 0.3) <= cd.prop1_bound_p1(n, 0.3, ref.sum(-1)) + 1e-12)


def test_prop1_adversarial_search():
    n, d_ = 5, 0.05

    # Realised-form lemma: ratio reaches 1 (a dominant token, one token nudged) and never exceeds it.
    def lemma_ratio(X):  # X: (pop, 2T) = (α, α^ref)
        a, b = X[:, :n], X[:, n:]
        return l1(cd.weights(a), cd.weights(b)) / cd.perturbation_l1_bound(a, b)

    assert 0.9 <= maximise(lemma_ratio, [(0.0, 5.0)] * (2 * n)) <= 1 + 1e-9
    # Any α in the δ-box around α^ref: the exact sup is attained, never exceeded.
    ref = np.array([3.0, 0.2, 0.0, 1.0, 0.5])
    for p_ in (1.0, 2.0):
        sup = cd.prop1_sup(ref, d_, p=p_)

        def box_ratio(A, p_=p_, sup=sup):  # A: (pop, T) moves in units of δ
            return l1(cd.weights(np.maximum(ref + d_ * A, 0), p=p_), cd.weights(ref, p=p_)) / sup

        assert 0.9 <= maximise(box_ratio, [(-1.0, 1.0)] * n) <= 1 + 1e-9
    # Closed form vs sharp form over reference profiles: the search gets within 1% of (T − 1)/T = 7/8 (the
    # dominant-token family of the test above), never above 1.
    m, d_ = 8, 1e-3
    worst = maximise(lambda R: cd.prop1_sup(R, d_) / cd.prop1_bound(R, d_), [(0.0, 10.0)] * m, maxiter=150)
    assert 0.99 * 7 / 8 <= worst <= 1 + 1e-9


def test_prop1_fallback_discontinuity():
    """p = 2, T = 2: a reference just below the fallback threshold is uniform, a δ-close row just above is
    not, so no bound C·δ can hold across the threshold; prop1_bound returns the trivial 2 there."""
    e_ = 1e-8
    ref = np.array([np.sqrt(e_ - 1e-13) - e_, 0.0])  # S_ref = ε − 1e-13 + ε² < ε
    alpha = ref + np.array([1e-9, 0.0])  # S ≈ ε − 1e-13 + 2√ε·1e-9 = ε + 1e-13 > ε
    assert ((ref + e_) ** 2).sum() <= e_ < ((alpha + e_) ** 2).sum()
    realised = l1(cd.weights(alpha, p=2), cd.weights(ref, p=2))
    assert realised > 0.99  # (1, 0)-like vs (0.5, 0.5)
    assert cd.prop1_bound(ref, 1e-9, p=2) == 2.0
    assert cd.perturbation_l1_bound(alpha, ref, p=2) == 2.0


# ------------------------------------------------------------------ §7 sharpening


def test_sharpening_raises_gini_and_lowers_etr():
    rng = np.random.default_rng(7)
    s = rng.exponential(size=(400, 12))
    ps = [0.5, 1.0, 2.0, 4.0]
    G = np.stack([cd.gini(cd.weights(s, p=q)) for q in ps])  # (4, 400)
    E = np.stack([cd.etr(cd.weights(s, p=q)) for q in ps])
    assert np.all(np.diff(G, axis=0) > 0) and np.all(np.diff(E, axis=0) < 0)
    # Adversarial: the smallest G(p=2) − G(p=1) over score profiles is 0 (constant profiles), never negative.
    worst = maximise(
        lambda A: cd.gini(cd.weights(A, p=1.0)) - cd.gini(cd.weights(A, p=2.0)), [(0.0, 5.0)] * 6
    )
    assert -1e-3 <= worst <= 1e-12
    # p → ∞ concentrates on the unique argmax: G → (T − 1)/T.
    assert cd.gini(cd.weights([1.0, 2.0, 3.0], p=200)) == pytest.approx(2 / 3, abs=1e-12)


# ------------------------------------------------------------------ §6 regimes, input checks, import


def test_predict_regime_labels():
    assert cd.predict_regime(0.0, 1e-6, 512, p=2.0)["regime"] == "fallback-uniform"
    near = cd.predict_regime(0.0, 1e-9, 100)
    assert near["regime"] == "near-uniform" and near["rho"] == pytest.approx(1.1)
    free = cd.predict_regime(0.0, 1.0, 100, p=2.0)
    assert free["regime"] == "free" and free["gini"][1] > 0.98 and free["fallback_possible"]
    # Ref scores in [1, 3], shifts δ = 0.01, p = 1: tied bound 2δ/(1 + ε) ≈ 0.02 (§5 mediant form).
    tied = cd.predict_regime(1.0, 3.0, 100, delta=0.01)
    assert tied["regime"] == "tied" and tied["tied_l1_max"] == pytest.approx(0.02, rel=1e-6)
    assert cd.predict_regime(1.0, 3.0, 100, delta=1.0)["regime"] == "free"


def test_tied_bound_covers_every_reference_in_the_range():
    """The predict_regime "tied" bound is a sup over reference profiles in [a, b] (§5, mediant form)."""
    rng = np.random.default_rng(8)
    n = 6
    for a, b, d_, p_ in [
        (0.2, 2.0, 0.05, 1.0),
        (0.1, 1.0, 0.02, 2.0),
        (0.5, 0.6, 0.2, 0.5),
        (1.0, 4.0, 0.1, 2.0),
    ]:
        tied = cd.predict_regime(a, b, n, p=p_, delta=d_)["tied_l1_max"]
        refs = rng.uniform(a, b, (200, n))
        refs[:50] = np.where(rng.random((50, n)) < 0.5, a, b)  # range endpoints, where D/v peaks
        assert np.all(cd.prop1_bound(refs, d_, p=p_) <= tied + 1e-12)
        alpha = np.maximum(refs + d_ * rng.choice([-1.0, 1.0], refs.shape), 0)
        assert np.all(l1(cd.weights(alpha, p=p_), cd.weights(refs, p=p_)) <= tied + 1e-12)
    # Attained by the constant reference at the bottom of the range: p = 1, a = 0.2 ≥ δ = 0.05 gives
    # 2Tδ / (T(a + ε)) = 2 · 0.05 / 0.2 = 0.5 both ways.
    tied = cd.predict_regime(0.2, 2.0, n, delta=0.05)["tied_l1_max"]
    assert tied == pytest.approx(0.5, rel=1e-6)
    assert cd.prop1_bound(np.full(n, 0.2), 0.05) == pytest.approx(tied, rel=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda: cd.weights([1.0], p=0.0),
        lambda: cd.weights([1.0], eps=-1.0),
        lambda: cd.weights(np.zeros(0)),
        lambda: cd.gini_interval(0.5, 3),
        lambda: cd.etr_interval(2.0, 0),
        lambda: cd.weight_ratio(2.0, 1.0),
        lambda: cd.l1_to_uniform_bound(1e-20, 3),
        lambda: cd.min_ratio_for_gini(1.0),
        lambda: cd.prop1_sup(np.zeros(17), 0.1),
        lambda: cd.prop1_bound(np.ones(3), -0.1),
        lambda: cd.predict_regime(0.0, 1.0, 0),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()


def test_theory_imports_without_torch():
    code = (
        "import sys, theory.credit_degeneracy; "
        "assert 'torch' not in sys.modules and 'arca_lab' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_the_arca_diagnostics_table_has_one_number_everywhere():
    """The ARCA paper's Gini/ETR table is its Table 3 (Table 2: accuracy; paper source: the third `table` of
    sections/06_experiments.tex, `tab:weight-diagnostics`). Every file of the repository must say so."""
    pattern = re.compile(r"ARCA(?:\s+paper)?(?:'s)?\s+Table\s+(\d)")  # also across a line break
    files = [REPO / "README.md"]
    for folder in ("theory", "arca_lab", "notebooks", "benchmarks", "tests"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".md", ".ipynb"}]
    found = {}
    for path in files:
        for number in pattern.findall(path.read_text(errors="ignore")):
            found.setdefault(number, []).append(str(path.relative_to(REPO)))
    assert set(found) == {"3"}, found
