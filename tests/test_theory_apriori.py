"""Tests of the a-priori KL bound for single-layer LoRA GRPO (theory/apriori.md, results A1–A7)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import sympy as sp
from scipy.optimize import minimize

from theory import apriori as ap
from theory.aposteriori import lora_row_diameter
from theory.schema import BoundInputs
from theory.softmax_kl import kl_ref_theta, kl_theta_ref


def _inputs(**kw) -> BoundInputs:
    base = dict(vocab_size=6, in_features=4, rank=2, alpha=4.0, lr=0.05, steps=20, input_radius=2.0)
    base.update(kw)
    return BoundInputs(**base)


# ---------------------------------------------------------------- schema validation
@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": -3}, "rank must be an integer >= 1"),
        ({"lr": -1e-3}, "lr must be >= 0"),
        ({"betas": (0.9, 0.8)}, "beta1**2 < beta2"),
        ({"scaling": "alpha/sqrt(r)"}, "'alpha/r', 'rslora', 'const'"),
        ({"optimizer": "lion"}, "'sgd', 'adam', 'adamw'"),
        ({"schedule": "polynomial"}, "'constant', 'constant_with_warmup', 'linear', 'cosine'"),
        ({"optimizer": "sgd", "grad_clip": None}, "needs grad_clip"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"a0_delta": 1.5}, "a0_delta"),
    ],
)
def test_bad_inputs_raise_naming_accepted_values(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        _inputs(**kw)


def test_optimizer_alias_and_array_validation() -> None:
    assert _inputs(optimizer="adamw_torch").optimizer == "adamw"
    with pytest.raises(ValueError, match="rank must be"):
        ap.apriori_kl_bound_array(_inputs(), rank=np.array([1, 0, 4]))
    with pytest.raises(ValueError, match="overrides must be among"):
        ap.apriori_kl_bound_array(_inputs(), betas=np.array([0.9]))


# ---------------------------------------------------------------- A1: scaling
def test_lora_scale_matches_peft_conventions() -> None:
    r = np.array([1, 4, 16, 64])
    assert np.allclose(ap.lora_scale("alpha/r", 32.0, r), [32, 8, 2, 0.5])
    assert np.allclose(ap.lora_scale("rslora", 32.0, r), [32, 16, 8, 4])
    assert np.allclose(ap.lora_scale("const", 32.0, r), [32, 32, 32, 32])


# ---------------------------------------------------------------- A2: schedules
def test_schedule_sum_closed_forms_symbolic() -> None:
    k, n, m, W = sp.symbols("k n m W", positive=True, integer=True)
    warm = sp.summation(k / W, (k, 0, m - 1))
    assert sp.simplify(warm - ap.WARMUP_SUM_EXPR.subs({ap.WARM_M: m, ap.WARM_W: W})) == 0
    assert sp.simplify(sp.summation(k / n, (k, 1, n)) - ap.DECAY_SUM_EXPRS["linear"].subs(ap.DECAY_N, n)) == 0
    # cosine: Σ_{k<n} ½(1 + cos(πk/n)) = n/2 + ½ Re Σ_{k<n} ω^k with ω = e^{iπ/n}; the geometric sum is
    # (1 − ω^n)/(1 − ω) = 2/(1 − ω) (ω^n = −1), and Re 2/(1 − e^{iθ}) = 1 for every real θ ≠ 0 mod 2π.
    omega = sp.Symbol("omega")
    assert sp.summation(omega**k, (k, 0, n - 1)).args[1][0] == (1 - omega**n) / (1 - omega)
    theta = sp.Symbol("theta", real=True)
    assert sp.simplify(sp.re(2 / (1 - sp.exp(sp.I * theta))) - 1) == 0
    assert sp.simplify(n / 2 + sp.Rational(1, 2) * 1 - ap.DECAY_SUM_EXPRS["cosine"].subs(ap.DECAY_N, n)) == 0
    # exact check for small n (sympy evaluates cos(πk/n) exactly for these)
    for nn in (1, 2, 3, 4, 6):
        s = sum(sp.Rational(1, 2) * (1 + sp.cos(sp.pi * kk / nn)) for kk in range(nn))
        assert sp.nsimplify(sp.simplify(s)) == sp.Rational(nn + 1, 2)


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_sum_lr_matches_multipliers(schedule: str) -> None:
    for T, W in [(1, 0), (10, 0), (10, 1), (100, 10), (7, 7), (5, 9), (37, 3)]:
        direct = 3e-4 * ap.lr_multipliers(schedule, T, W).sum()
        assert ap.sum_lr(schedule, 3e-4, T, W) == pytest.approx(direct, rel=1e-12, abs=1e-18)
    # broadcasting
    T = np.array([[10], [100]])
    got = ap.sum_lr(schedule, np.array([1e-3, 2e-3]), T, 5)
    assert got.shape == (2, 2)
    assert got[1, 1] == pytest.approx(2e-3 * ap.lr_multipliers(schedule, 100, 5).sum(), rel=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_lr_multipliers_match_transformers(schedule: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for T, W in [(12, 3), (20, 0), (4, 6)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = transformers.get_scheduler(schedule, opt, num_warmup_steps=W, num_training_steps=T)
        lrs = []
        for _ in range(T):
            lrs.append(opt.param_groups[0]["lr"])  # lr used by this optimiser step
            opt.step()
            sched.step()
        assert np.allclose(ap.lr_multipliers(schedule, T, W), lrs, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- A3: Adam step constant
def _adam_ratio(g: np.ndarray, b1: float, b2: float) -> float:
    """|m̂_t| / √v̂_t after the gradient sequence g (torch Adam recursion, m₀ = v₀ = 0, ε = 0)."""
    m = v = 0.0
    for gk in g:
        m = b1 * m + (1 - b1) * gk
        v = b2 * v + (1 - b2) * gk**2
    t = len(g)
    return abs(m / (1 - b1**t)) / np.sqrt(v / (1 - b2**t))


def test_adam_constant_attained_symbolic() -> None:
    # Worst case g_k = (β1/β2)^{t−k} (Cauchy–Schwarz equality) gives (m̂_t/√v̂_t)² = C_t² exactly.
    b1, b2 = ap.BETA1, ap.BETA2
    for t in range(1, 5):
        m = v = 0
        for k in range(1, t + 1):
            gk = (b1 / b2) ** (t - k)
            m, v = b1 * m + (1 - b1) * gk, b2 * v + (1 - b2) * gk**2
        ratio_sq = (m / (1 - b1**t)) ** 2 / (v / (1 - b2**t))
        assert sp.simplify(ratio_sq - ap.ADAM_C_EXPR.subs(ap.STEP, t) ** 2) == 0
    assert sp.simplify(ap.ADAM_C_EXPR.subs(ap.STEP, 1)) == 1


def test_adam_constant_below_limit_symbolic() -> None:
    # C_∞² − C_t² ≥ 0 ⇔ (1 − β1^t)² − (1 − β2^t)(1 − γ^t) ≥ 0, and that difference is (β2^t − β1^t)²/β2^t.
    b1, b2, t = ap.BETA1, ap.BETA2, ap.STEP
    gap = (1 - b1**t) ** 2 - (1 - b2**t) * (1 - (b1**2 / b2) ** t)
    assert sp.simplify(gap - (b2**t - b1**t) ** 2 / b2**t) == 0
    ratio = ap.ADAM_C_EXPR**2 / ap.ADAM_C_LIMIT_EXPR**2
    assert sp.simplify(ratio - (1 - b2**t) * (1 - (b1**2 / b2) ** t) / (1 - b1**t) ** 2) == 0
    ts = np.arange(1, 3000)
    c = ap.adam_step_constant(ts, 0.9, 0.999)
    assert np.all(c <= ap.adam_step_constant_limit(0.9, 0.999) * (1 + 1e-12))
    assert ap.adam_step_constant_limit(0.9, 0.999) == pytest.approx(0.1 / np.sqrt(1e-3 * (1 - 0.81 / 0.999)))


@pytest.mark.parametrize(("b1", "b2"), [(0.9, 0.999), (0.5, 0.6), (0.0, 0.99)])
def test_adam_constant_adversarial(b1: float, b2: float) -> None:
    for t in (1, 3, 12):
        C = float(ap.adam_step_constant(t, b1, b2))
        seen = [0.0]

        def obj(g: np.ndarray, seen=seen, C=C) -> float:
            r = _adam_ratio(g, b1, b2) / C
            seen[0] = max(seen[0], r)
            return -r

        best = 0.0
        for s in range(3):
            g0 = np.random.default_rng(s).normal(size=t)
            best = max(best, -minimize(obj, g0, method="Nelder-Mead", options={"maxiter": 4000}).fun)
        assert best >= 0.99
        assert seen[0] <= 1 + 1e-9


def test_adam_constant_matches_torch_step() -> None:
    torch = pytest.importorskip("torch")
    b1, b2, lr = 0.9, 0.999, 0.01
    for t in (1, 2, 7, 40):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=0.0, weight_decay=0.0)
        before = 0.0
        for k in range(1, t + 1):
            before = float(p.detach())
            p.grad = torch.tensor([(b1 / b2) ** (t - k)], dtype=torch.float64)
            opt.step()
        step = abs(float(p.detach()) - before)
        assert step == pytest.approx(lr * float(ap.adam_step_constant(t, b1, b2)), rel=1e-10)


# ---------------------------------------------------------------- A4: ‖A₀‖₂
def test_a0_worst_case_attained_and_high_probability_holds() -> None:
    for r, d in [(1, 8), (4, 16), (8, 64)]:
        A_const = np.full((r, d), 1 / np.sqrt(d))  # every entry at peft's bound
        assert np.linalg.norm(A_const, 2) == pytest.approx(ap.a0_norm_bound(r, d))
    rng = np.random.default_rng(4)
    for r, d in [(2, 32), (16, 64), (64, 128)]:
        bound = ap.a0_norm_bound(r, d, delta=0.01)
        assert bound < np.sqrt(r)  # the high-probability bound improves on the worst case here
        samples = rng.uniform(-1, 1, (30, r, d)) / np.sqrt(d)  # 30 peft inits
        assert np.linalg.svd(samples, compute_uv=False)[:, 0].max() <= bound


def test_a0_law_is_peft_init() -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    lm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    A = lm.base_model.model[0].lora_A["default"].weight.detach().double().numpy()
    B = lm.base_model.model[0].lora_B["default"].weight.detach().double().numpy()
    assert A.shape == (8, 64) and np.all(B == 0)
    assert np.abs(A).max() <= 1 / np.sqrt(64)
    assert np.abs(A).max() > 0.9 / np.sqrt(64)  # uniform on the full interval, not a smaller one
    assert lm.base_model.model[0].scaling["default"] == pytest.approx(float(ap.lora_scale("alpha/r", 16, 8)))


# ---------------------------------------------------------------- A5: joint product maximum
def test_joint_product_max_symbolic() -> None:
    a, rho, u = ap.A0, ap.RHO_J, sp.Symbol("u", nonnegative=True)
    g = (1 - u**2) * (a + rho * u) ** 2  # (b(a0 + a)/ρ)² with a = ρu, b = ρ√(1−u²)
    assert sp.simplify(sp.diff(g, u) - 2 * (a + rho * u) * (rho - a * u - 2 * rho * u**2)) == 0
    assert sp.simplify((rho - a * u - 2 * rho * u**2).subs(u, ap.U_STAR_EXPR)) == 0
    assert sp.simplify(ap.U_STAR_EXPR - (-a + sp.sqrt(a**2 + 8 * rho**2)) / (4 * rho)) == 0
    assert sp.simplify(ap.F_STAR_EXPR.subs(a, 0) - rho**2 / 2) == 0


def test_joint_product_max_adversarial() -> None:
    for a0, rho in [(0.0, 1.0), (1.0, 0.3), (2.0, 5.0), (10.0, 0.01)]:
        F = float(ap.joint_product_max(a0, rho))
        # dense scan of the quarter disk boundary (a, b ≥ 0, a² + b² = ρ²) and random interior points
        th = np.linspace(0, np.pi / 2, 200001)
        vals = rho * np.sin(th) * (a0 + rho * np.cos(th))
        assert vals.max() <= F * (1 + 1e-12)
        assert vals.max() >= F * (1 - 1e-9)
        rng = np.random.default_rng(5)
        pts = rng.uniform(0, rho, size=(10000, 2))
        pts = pts[np.hypot(pts[:, 0], pts[:, 1]) <= rho]
        assert np.all(pts[:, 1] * (a0 + pts[:, 0]) <= F * (1 + 1e-12))
    # lambdified expression vs sympy evaluation at seeded points
    rng = np.random.default_rng(6)
    for a0, rho in rng.exponential(2, size=(5, 2)):
        want = float(ap.F_STAR_EXPR.subs({ap.A0: a0, ap.RHO_J: rho}).evalf(30))
        assert float(ap.joint_product_max(a0, rho)) == pytest.approx(want, rel=1e-13)


# ---------------------------------------------------------------- A6/A7: scalar vs array, lambdify
def test_array_version_matches_scalar() -> None:
    ranks, lrs, steps = np.array([1, 2, 8]), np.array([[1e-3], [1e-2]]), 30
    for opt in ("sgd", "adamw"):
        base = _inputs(optimizer=opt, schedule="cosine", warmup=3, grad_clip=0.5, steps=steps)
        arr = ap.apriori_kl_bound_array(base, rank=ranks, lr=lrs)
        assert arr["kl_ref_theta"].shape == (2, 3)
        for i in range(2):
            for j in range(3):
                one = ap.apriori_kl_bound(dataclasses.replace(base, rank=int(ranks[j]), lr=float(lrs[i, 0])))
                for key in ("kl_ref_theta", "kl_theta_ref", "logit_range", "a_op", "b_frob", "delta_w_op"):
                    assert arr[key][i, j] == pytest.approx(one[key], rel=1e-12)


def test_range_expressions_lambdified_vs_sympy() -> None:
    rng = np.random.default_rng(7)
    s_sym = sp.Symbol("s", positive=True)
    for _ in range(4):
        s, a0, c, S, R, tau, M = rng.exponential(1.0, 7)
        r, d = int(rng.integers(1, 9)), int(rng.integers(1, 50))
        want = ap.SGD_RANGE_EXPR.subs(
            {s_sym: s, ap.A0: a0, ap.CLIP: c, ap.LR_SUM: S, ap.RADIUS: R, ap.TEMP: tau}
        )
        assert ap._sgd_range(s, a0, c, S, R, tau) == pytest.approx(float(want.evalf(30)), rel=1e-13)
        want = ap.ADAM_RANGE_EXPR.subs(
            {s_sym: s, ap.A0: a0, ap.REACH: M, ap.RANK: r, ap.D_IN: d, ap.RADIUS: R, ap.TEMP: tau}
        )
        assert ap._adam_range(s, a0, M, r, d, R, tau) == pytest.approx(float(want.evalf(30)), rel=1e-13)


def test_rank_factors_are_named_and_separate() -> None:
    out = ap.apriori_kl_bound(_inputs(optimizer="adamw", rank=4, alpha=8.0, scaling="rslora", a0_norm=0.7))
    assert out["scale"] == pytest.approx(4.0)  # 8/√4
    assert out["a0_norm"] == 0.7 and out["a0_mode"] == "realised"
    assert out["b_row_diff"] == pytest.approx(2 * out["optimizer_reach"] * np.sqrt(4))
    assert out["a_op"] == pytest.approx(0.7 + out["optimizer_reach"] * np.sqrt(4 * 4))
    sgd = ap.apriori_kl_bound(_inputs(optimizer="sgd", grad_clip=0.3))
    assert sgd["optimizer_reach"] == pytest.approx(0.3 * ap.sum_lr("constant", 0.05, 20))
    assert sgd["a0_mode"] == "worst_case" and sgd["a0_norm"] == pytest.approx(np.sqrt(2))
    assert sgd["kl_ref_theta"] <= sgd["kl_ref_theta_range_sq_over_8"]


# ---------------------------------------------------------------- the bound vs a simulated LoRA GRPO run
def _simulate(inp: BoundInputs, seed: int, n_ctx: int = 8, group: int = 4) -> dict:
    """Single-layer LoRA GRPO in numpy: π(·|x) = softmax((W₀ + sBA)x/τ), rewards 1[y ∈ good(x)], group-normalised
    advantages, loss −mean A·log π(y|x), global-norm clipping of (∇A, ∇B), then SGD or AdamW (torch's update)."""
    rng = np.random.default_rng(seed)
    V, d, r, R, tau = inp.vocab_size, inp.in_features, inp.rank, inp.input_radius, inp.temperature
    s = float(ap.lora_scale(inp.scaling, inp.alpha, r))
    W0 = rng.normal(size=(V, d)) * 0.5
    A = rng.uniform(-1, 1, (r, d)) / np.sqrt(d)  # peft init
    B = np.zeros((V, r))
    a0 = np.linalg.norm(A, 2)
    X = rng.normal(size=(n_ctx, d))
    X *= R / np.linalg.norm(X, axis=1, keepdims=True)  # contexts on the sphere of radius R
    good = rng.random((n_ctx, V)) < 0.3
    lam = ap.lr_multipliers(inp.schedule, inp.steps, inp.warmup)
    b1, b2 = inp.betas
    mA, vA, mB, vB = np.zeros_like(A), np.zeros_like(A), np.zeros_like(B), np.zeros_like(B)
    for t in range(1, inp.steps + 1):
        eta = inp.lr * lam[t - 1]
        W = W0 + s * B @ A
        logits = X @ W.T / tau  # (n_ctx, V)
        P = np.exp(logits - logits.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        G = np.zeros((V, d))
        for c in range(n_ctx):
            ys = rng.choice(V, size=group, p=P[c])
            rew = good[c, ys].astype(float)
            adv = (rew - rew.mean()) / max(rew.std(ddof=1), 1e-8)
            for y, av in zip(ys, adv, strict=True):
                e = -P[c].copy()
                e[y] += 1.0
                G -= av * np.outer(e, X[c]) / tau / (n_ctx * group)  # ∂(−A log π_y)/∂W
        gB, gA = s * G @ A.T, s * B.T @ G
        if inp.grad_clip is not None:
            total = np.sqrt(np.sum(gA**2) + np.sum(gB**2))
            coef = min(1.0, inp.grad_clip / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_
            gA, gB = gA * coef, gB * coef
        if inp.optimizer == "sgd":
            A = A * (1 - eta * inp.weight_decay) - eta * gA
            B = B * (1 - eta * inp.weight_decay) - eta * gB
        else:
            A, B = A * (1 - eta * inp.weight_decay), B * (1 - eta * inp.weight_decay)
            mA, vA = b1 * mA + (1 - b1) * gA, b2 * vA + (1 - b2) * gA**2
            mB, vB = b1 * mB + (1 - b1) * gB, b2 * vB + (1 - b2) * gB**2
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            A = A - eta / bc1 * mA / (np.sqrt(vA / bc2) + inp.eps)
            B = B - eta / bc1 * mB / (np.sqrt(vB / bc2) + inp.eps)
    return {"W0": W0, "A": A, "B": B, "a0": a0, "s": s, "X": X}


def _measured_max_kl(sim: dict, R: float, tau: float, seed: int) -> float:
    """Max over x in the ball of both KL directions: training contexts, random points, the range-maximising x,
    and a local ascent from each of them."""
    W0, dW = sim["W0"], sim["s"] * sim["B"] @ sim["A"]
    rng = np.random.default_rng(seed)
    diam, i, j = lora_row_diameter(sim["B"], sim["A"], sim["s"])
    starts = [*sim["X"], *(rng.normal(size=(6, W0.shape[1])))]
    if diam > 0:
        starts.append(dW[i] - dW[j])

    def neg_kl(u: np.ndarray) -> float:
        x = R * u / max(np.linalg.norm(u), 1e-300)
        return -max(float(kl_ref_theta(W0 @ x, dW @ x, tau)), float(kl_theta_ref(W0 @ x, dW @ x, tau)))

    best = 0.0
    for u in starts:
        best = max(best, -neg_kl(u), -minimize(neg_kl, u, method="Nelder-Mead", options={"maxiter": 300}).fun)
    return best


@pytest.mark.parametrize(
    "kw",
    [
        dict(optimizer="sgd", lr=0.5, steps=40, grad_clip=0.2, schedule="constant"),
        dict(
            optimizer="sgd",
            lr=1.0,
            steps=40,
            grad_clip=0.1,
            schedule="cosine",
            warmup=5,
            rank=4,
            scaling="rslora",
        ),
        dict(
            optimizer="sgd",
            lr=0.3,
            steps=30,
            grad_clip=1.0,
            schedule="linear",
            warmup=3,
            weight_decay=0.1,
            rank=1,
        ),
        dict(optimizer="adamw", lr=0.02, steps=40, schedule="constant"),
        dict(optimizer="adamw", lr=0.05, steps=40, schedule="cosine", warmup=5, rank=4, weight_decay=0.01),
        dict(optimizer="adam", lr=0.01, steps=30, schedule="linear", rank=1, scaling="const", alpha=1.0),
    ],
)
def test_bound_holds_on_simulated_lora_grpo(kw: dict) -> None:
    inp = _inputs(vocab_size=6, in_features=4, input_radius=2.0, **{"rank": 2, "alpha": 4.0, **kw})
    sim = _simulate(inp, seed=11)
    for a0_given in (sim["a0"], None):  # realised ‖A₀‖₂, then peft's worst case √r
        b = ap.apriori_kl_bound(dataclasses.replace(inp, a0_norm=a0_given))
        A, B, s = sim["A"], sim["B"], sim["s"]
        assert np.linalg.norm(B) <= b["b_frob"] * (1 + 1e-9)
        assert np.linalg.norm(A, 2) <= b["a_op"] * (1 + 1e-9)
        diff = B[:, None, :] - B[None, :, :]
        assert np.linalg.norm(diff, axis=-1).max() <= b["b_row_diff"] * (1 + 1e-9)
        assert np.linalg.norm(s * B @ A, 2) <= b["delta_w_op"] * (1 + 1e-9)
        assert inp.input_radius * lora_row_diameter(B, A, s)[0] / inp.temperature <= b["logit_range"] * (
            1 + 1e-9
        )
    measured = _measured_max_kl(sim, inp.input_radius, inp.temperature, seed=12)
    assert 0 < measured <= b["kl_ref_theta"]
    assert measured <= b["kl_theta_ref"]
