"""Tests of the a-posteriori bounds and the credit link (theory/aposteriori.md, results P1–P4)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import differential_evolution, minimize
from scipy.spatial.distance import pdist

from theory import aposteriori as po
from theory.softmax_kl import kl_ref_theta, kl_theta_ref, log_softmax, p_star


def _adversarial_max(
    ratio_fn, x0s: list[np.ndarray], maxiter: int = 2000, method: str = "Nelder-Mead"
) -> tuple[float, float]:
    """Maximise ratio_fn from several starts; return (best optimum, largest ratio at any evaluated point)."""
    seen = [0.0]

    def obj(x: np.ndarray) -> float:
        r = ratio_fn(x)
        seen[0] = max(seen[0], r)
        return -r

    best = max(-minimize(obj, x0, method=method, options={"maxiter": maxiter}).fun for x0 in x0s)
    return best, seen[0]


# ---------------------------------------------------------------- row diameter
def test_row_diameter_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    cases = [
        rng.normal(size=(2, 3)),
        rng.normal(size=(700, 5)) * rng.exponential(size=(700, 1)),
        np.repeat(rng.normal(size=(5, 4)), 40, axis=0),  # many duplicate rows
        (lambda Y: Y / np.linalg.norm(Y, axis=1, keepdims=True))(rng.normal(size=(600, 3))),  # no pruning
        np.zeros((10, 3)),
    ]
    for Y in cases:
        dist, i, j = po.row_diameter(Y)
        assert dist == pytest.approx(pdist(Y).max(), rel=1e-12, abs=1e-15)
        assert np.linalg.norm(Y[i] - Y[j]) == pytest.approx(dist, rel=1e-12, abs=1e-15)
    B, A = rng.normal(size=(400, 3)), rng.normal(size=(3, 20))
    assert po.lora_row_diameter(B, A, 0.5)[0] == pytest.approx(pdist(0.5 * B @ A).max(), rel=1e-10)
    A_rank1 = np.outer(np.ones(3), rng.normal(size=20))  # A Aᵀ singular
    assert po.lora_row_diameter(B, A_rank1, 2.0)[0] == pytest.approx(pdist(2.0 * B @ A_rank1).max(), rel=1e-7)


# ---------------------------------------------------------------- P1: exact max range over the ball
def test_max_range_over_ball_exact_and_adversarial() -> None:
    rng = np.random.default_rng(1)
    for trial in range(3):
        V, d = 7, 4
        R, tau = 1.7, 0.8
        dW = rng.normal(size=(V, d))
        out = po.aposteriori_kl_bound(dW, input_radius=R, temperature=tau)
        x = out["x_star"]
        assert np.linalg.norm(x) == pytest.approx(R)
        z = dW @ x / tau
        assert z.max() - z.min() == pytest.approx(out["logit_range"], rel=1e-12)  # attained

        def ratio(
            u: np.ndarray, dW: np.ndarray = dW, out: dict = out, R: float = R, tau: float = tau
        ) -> float:
            zz = dW @ (R * u / np.linalg.norm(u)) / tau
            return float((zz.max() - zz.min()) / out["logit_range"])

        best, seen = _adversarial_max(ratio, [rng.normal(size=d) for _ in range(3)])
        assert best >= 0.999, trial
        assert seen <= 1 + 1e-9


# ---------------------------------------------------------------- P2: RMSNorm radius
def _rmsnorm(h: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return g * h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + eps)


def test_rmsnorm_radius_holds_and_is_tight() -> None:
    rng = np.random.default_rng(2)
    d = 8
    g = rng.normal(size=d)
    R = po.rmsnorm_radius(g)
    H = rng.normal(size=(5000, d)) * rng.exponential(3, size=(5000, 1))
    assert np.all(np.linalg.norm(_rmsnorm(H, g, 1e-6), axis=1) <= R * (1 + 1e-12))
    # every coordinate axis is a local maximum, so search globally (differential evolution, seeded)
    seen = [0.0]

    def neg_ratio(h: np.ndarray) -> float:
        r = float(np.linalg.norm(_rmsnorm(h, g, 1e-6)) / R)
        seen[0] = max(seen[0], r)
        return -r

    res = differential_evolution(neg_ratio, [(-10, 10)] * d, seed=0, tol=1e-12, maxiter=300)
    assert -res.fun >= 0.999  # h concentrated on argmax |g| (with |h| ≫ √eps)
    assert seen[0] <= 1 + 1e-9


def test_rmsnorm_formula_matches_qwen3() -> None:
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    norm = mod.Qwen3RMSNorm(8, eps=1e-6).double()
    g = np.random.default_rng(3).normal(size=8)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(g))
    h = np.random.default_rng(4).normal(size=(3, 8)) * 5
    want = norm(torch.from_numpy(h)).detach().numpy()
    assert np.allclose(_rmsnorm(h, g, 1e-6), want, rtol=1e-6)  # Qwen3RMSNorm normalises in float32
    assert np.all(np.linalg.norm(want, axis=1) <= po.rmsnorm_radius(g))


# ---------------------------------------------------------------- P3: KL bound, holds, tight, not vacuous
def test_aposteriori_bound_holds_on_random_instances() -> None:
    rng = np.random.default_rng(5)
    for _ in range(5):
        V, d, r = 12, 6, 2
        W0, B, A = rng.normal(size=(V, d)), rng.normal(size=(V, r)), rng.normal(size=(r, d))
        g = rng.normal(size=d)
        out = po.aposteriori_kl_bound(B=B, A=A, scale=0.3, norm_weight=g, temperature=1.3)
        dW = 0.3 * B @ A
        X = _rmsnorm(rng.normal(size=(3000, d)) * 3, g, 1e-6)  # inputs the way lm_head sees them
        tok = po.per_token_kl_bound(dW, X, temperature=1.3, base_weight=W0)
        worst = np.maximum(tok["kl_ref_theta_exact"], tok["kl_theta_ref_exact"])
        assert np.all(worst <= tok["kl_sharp"] * (1 + 1e-9) + 1e-15)  # per token
        assert np.all(tok["logit_range"] <= out["logit_range"] * (1 + 1e-12))  # each x is in the ball
        assert worst.max() <= out["kl_ref_theta"]


def _tight_instance(rng: np.random.Generator, V: int = 5, d: int = 4):
    """Head-only LoRA instance where the bound is nearly attained: at x_star, W₀ puts mass P* on the row with the
    top shift and 1 − P* on the row with the bottom shift (the two-point maximiser of softmax_kl.md L3)."""
    dW, R = rng.normal(size=(V, d)), 1.5
    out = po.aposteriori_kl_bound(dW, input_radius=R)
    i, j = out["argmax_rows"]
    x = out["x_star"]
    ps = float(p_star(out["logit_range"]))
    a = np.full(V, -40.0)  # other rows negligible
    top, bot = (i, j) if dW[i] @ x > dW[j] @ x else (j, i)
    a[top], a[bot] = np.log(ps), np.log(1 - ps)
    W0 = np.outer(a, x) / R**2  # W₀ x = a at x_star
    return dW, W0, x, R, out


def test_aposteriori_bound_tight_and_not_vacuous() -> None:
    rng = np.random.default_rng(6)
    dW, W0, x, R, out = _tight_instance(rng)
    kl = float(kl_ref_theta(W0 @ x, dW @ x))
    assert kl <= out["kl_ref_theta"]
    assert kl >= 0.999 * out["kl_ref_theta"]  # nearly attained
    halved_radius = po.aposteriori_kl_bound(dW, input_radius=R / 2)
    halved_adapter = po.aposteriori_kl_bound(dW / 2, input_radius=R)
    assert kl > halved_radius["kl_ref_theta"]  # the bound with halved inputs is violated
    assert kl > halved_adapter["kl_ref_theta"]
    assert kl > halved_radius["kl_ref_theta_range_sq_over_8"]
    # KL(π_θ‖π_ref) direction: base W₀' = W₀ + ΔW with adapter ΔW' = −ΔW (same row diameter, same bound)
    # has KL(π_θ'‖π_ref') = KL(softmax(W₀x) ‖ softmax((W₀ + ΔW)x)) = kl.
    kl_rev = float(kl_theta_ref((W0 + dW) @ x, -dW @ x))
    assert kl_rev == pytest.approx(kl, rel=1e-12)
    assert po.aposteriori_kl_bound(-dW, input_radius=R)["kl_theta_ref"] == pytest.approx(out["kl_theta_ref"])
    assert kl_rev > po.aposteriori_kl_bound(-dW, input_radius=R / 2)["kl_theta_ref"]


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="input_radius, or norm_weight"):
        po.aposteriori_kl_bound(np.eye(3))
    with pytest.raises(ValueError, match="delta_w"):
        po.aposteriori_kl_bound(input_radius=1.0)
    with pytest.raises(ValueError, match=r"W_lm \(V, d\)"):
        po.credit_link_bound(np.eye(3), np.ones((2, 4)), np.ones(2))


# ---------------------------------------------------------------- P4: credit link
def _alpha_div(W: np.ndarray, h: np.ndarray, dh: np.ndarray, y: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """|log π_θ(y_t) − log π_ref(y_t)| with logits W h / τ, computed from scratch."""
    lp_new = log_softmax((h + dh) @ W.T / tau)
    lp_ref = log_softmax(h @ W.T / tau)
    idx = np.arange(len(y))
    return np.abs(lp_new[idx, y] - lp_ref[idx, y])


def test_credit_link_chain_holds_on_random_tokens() -> None:
    rng = np.random.default_rng(7)
    V, d, N, tau = 40, 8, 300, 0.9
    W = rng.normal(size=(V, d))
    h, dh = rng.normal(size=(N, d)) * 3, rng.normal(size=(N, d)) * rng.exponential(0.5, size=(N, 1))
    y = rng.integers(0, V, size=N)
    lp_diff = log_softmax((h + dh) @ W.T / tau)[np.arange(N), y] - log_softmax(h @ W.T / tau)[np.arange(N), y]
    out = po.credit_link_bound(W, dh, lp_diff, temperature=tau)
    assert out["holds"]
    assert out["op_norm"] == pytest.approx(np.linalg.svd(W, compute_uv=False)[0], rel=1e-12)
    assert out["row_diameter"] == pytest.approx(pdist(W).max(), rel=1e-12)
    assert np.all(out["alpha_div"] <= out["range_bound"] * (1 + 1e-12))
    assert np.all(out["range_bound"] <= out["diameter_bound"] * (1 + 1e-12))
    assert np.all(out["diameter_bound"] <= out["op_bound"] * (1 + 1e-12))
    assert np.allclose(out["prop2_bound"] / out["op_bound"], np.sqrt(2))
    # per-token KL (both directions) of the next-token distribution is ≤ K(range)
    a, z = h @ W.T, dh @ W.T
    assert np.all(
        np.maximum(kl_ref_theta(a, z, tau), kl_theta_ref(a, z, tau)) <= out["kl_sharp"] * (1 + 1e-9)
    )
    # a violated chain is reported: claim a log-prob change larger than the range bound
    bad = po.credit_link_bound(W, dh, lp_diff + np.where(np.arange(N) == 0, 1e3, 0.0), temperature=tau)
    assert not bad["holds"]


def test_sqrt2_constant_is_best_and_prop2_is_loose() -> None:
    # Worst case: V = d = 2, W = L·I, Δh = β(1, −1)/√2, y = 0 with p_ref(y) → 0 (h = (−M, 0)):
    # α_div → range(WΔh) = √2·Lβ = √2·‖W‖₂·‖Δh‖; ARCA Prop. 2's 2Lβ is larger by √2.
    L, beta = 1.7, 0.6
    W = L * np.eye(2)
    dh = beta * np.array([[1.0, -1.0]]) / np.sqrt(2)
    ratios = []
    for M in (1.0, 5.0, 20.0, 40.0):
        h = np.array([[-M, 0.0]])
        a = _alpha_div(W, h, dh, np.array([0]))
        out = po.credit_link_bound(W, dh, a)
        ratios.append(float(a[0] / out["op_bound"][0]))
        assert out["holds"]
        assert a[0] <= out["prop2_bound"][0] / np.sqrt(2) * (1 + 1e-12)
    assert ratios == sorted(ratios) and ratios[-1] >= 0.999
    # adversarial search over W (2×2), h, Δh: α_div / (√2‖W‖₂‖Δh‖) approaches 1, never passes it;
    # so α_div / (2‖W‖₂‖Δh‖) tops out at 1/√2 ≈ 0.707.
    rng = np.random.default_rng(8)

    def ratio(x: np.ndarray) -> float:
        Wx, hx, dhx = x[:4].reshape(2, 2), 20 * np.tanh(x[4:6]), x[6:8]
        nd = np.linalg.norm(dhx)
        if nd < 1e-3:
            return 0.0
        a = _alpha_div(Wx, hx[None], dhx[None], np.array([0]))[0]
        return float(a / (np.sqrt(2) * np.linalg.norm(Wx, 2) * nd))

    best, seen = _adversarial_max(ratio, [rng.normal(size=8) for _ in range(4)], 4000)
    assert best >= 0.99
    assert seen <= 1 + 1e-9
