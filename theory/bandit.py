"""Single-layer LoRA GRPO on a contextual bandit: an exact numpy simulator of the MERL single-layer setting.

The policy is one softmax-linear layer with a LoRA adapter, trained by GRPO on a verifiable reward; every
gradient is in closed form, the optimisers follow torch semantics, and KL to the reference policy is
measured exactly over the V actions. Used to test the a-priori bounds (theory/apriori.py) and the rank
scaling predictions (theory/rank_scaling.md). Vectorised over seeds (leading axis S).

Notation:
    S  seeds      V  actions      d  input dim (peft in_features)      r  LoRA rank
    N  contexts per step          K  sampled actions per context      τ  temperature      R  input radius
    π_θ(·|x) = softmax(u / τ),  u = (W₀ + s·B A) x,  B ∈ R^{V×r} (B₀ = 0),  A ∈ R^{r×d}
    A₀ iid U[−1/√d, 1/√d]: peft's kaiming_uniform_(a=√5) (gain √(1/3), bound gain·√(3/d) = 1/√d)
    s = alpha/r | alpha/√r ("rslora") | alpha ("const")                       (theory/apriori.py A1)
    reward(x, a) = 1{a = argmax_v (W* x)_v}, W* a hidden linear teacher
    advantages  A_ik = (r_ik − mean_k r_ik) / max(std_k r_ik, 1e-8)  (ARCA paper, arXiv 2606.00257, GRPO def.;
                std with torch's default Bessel correction, as TRL's ``.std(dim=1)``)
    loss        L = −(1/(N K)) Σ_ik A_ik log π_θ(a_ik | x_i)
    gradients   ∂L/∂u_i = −(1/(N K τ)) Σ_k A_ik (e_{a_ik} − π_i);  G = Σ_i ∂L/∂u_i x_iᵀ  (V, d)
                ∂L/∂B = s G Aᵀ,  ∂L/∂A = s Bᵀ G                        (chain rule through W = W₀ + s B A)

Random streams per seed (numpy SeedSequence([seed, k])): k=0 teacher W* and W₀, k=1 A₀, k=2 evaluation
contexts, k=3 training contexts, k=4 action-sampling uniforms. A₀ has its own stream, so the rank-r A₀ is the
first r rows of the rank-32 one (torch fills kaiming_uniform_ row-major, so peft under a fixed seed nests the
same way), and the teacher, contexts and sampling uniforms are shared across ranks and optimisers (common
random numbers: rank comparisons within a seed are paired).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from theory import aposteriori, apriori
from theory.apriori import lora_scale, lr_multipliers
from theory.schema import OPTIMIZER_ALIASES, BoundInputs


# ---------------------------------------------------------------- numerics: softmax and exact KL
def log_softmax(u: np.ndarray) -> np.ndarray:
    m = np.max(u, axis=-1, keepdims=True)
    return u - m - np.log(np.sum(np.exp(u - m), axis=-1, keepdims=True))


def _exp_excess(w: np.ndarray) -> np.ndarray:
    """e^w − 1 − w without cancellation (Taylor to w⁶ for |w| < 1e-2: truncation < 1e-16 relative)."""
    small = np.abs(w) < 1e-2
    ws = np.where(small, w, 0.0)
    wb = np.where(small, 0.0, w)
    series = ws * ws * (0.5 + ws * (1 / 6 + ws * (1 / 24 + ws * (1 / 120 + ws / 720))))
    return np.where(small, series, np.expm1(wb) - wb)


def kl_from_logprobs(logp: np.ndarray, z: np.ndarray) -> np.ndarray:
    """KL(p ‖ softmax(log p + z)) over the last axis, accurate down to KL ~ 1e-300.

    With w = z − pᵀz (KL is shift-invariant, pᵀw = 0): KL = log Σ p e^w = log1p(Σ p (e^w − 1 − w)), a sum of
    non-negative terms, so tiny shifts (KL ~ ½Var_p z ≪ 1e-12) keep full relative precision where the lse
    form lse(a+z) − lse(a) − pᵀz cancels. Large shifts (max w > 30) use the lse form.
    """
    p = np.exp(logp)
    w = z - np.sum(p * z, axis=-1, keepdims=True)
    small = np.log1p(np.sum(p * _exp_excess(np.minimum(w, 30.0)), axis=-1))
    y = logp + w
    m = np.max(y, axis=-1, keepdims=True)
    lse = (m + np.log(np.sum(np.exp(y - m), axis=-1, keepdims=True)))[..., 0]
    return np.maximum(np.where(np.max(w, axis=-1) > 30.0, lse, small), 0.0)


def kl_pair(a: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KL(π_ref‖π_θ), KL(π_θ‖π_ref)) for reference logits a and shift z (both already divided by τ)."""
    logp = log_softmax(a)
    logq = log_softmax(a + z)
    return kl_from_logprobs(logp, z), kl_from_logprobs(logq, -z)


def _kl_input_grad(W0: np.ndarray, dW: np.ndarray, x: np.ndarray, tau: float) -> tuple[np.ndarray, ...]:
    """KL(softmax(W₀x/τ) ‖ softmax((W₀+ΔW)x/τ)) and its gradient in x. W0, dW (..., V, d), x (..., m, d).

    ∇_x = [W₀ᵀ(q − p − p∘(z − pᵀz)) + ΔWᵀ(q − p)] / τ with z = ΔW x / τ (differentiate lse(a+z) − lse(a) − pᵀz).
    """
    a = x @ W0.swapaxes(-1, -2) / tau  # (..., m, V)
    z = x @ dW.swapaxes(-1, -2) / tau
    logp = log_softmax(a)
    p, q = np.exp(logp), np.exp(log_softmax(a + z))
    zc = z - np.sum(p * z, axis=-1, keepdims=True)
    coef0 = q - p - p * zc  # (..., m, V)
    grad = (coef0 @ W0 + (q - p) @ dW) / tau
    return kl_from_logprobs(logp, z), grad


def ball_max_kl(
    W0: np.ndarray, dW: np.ndarray, tau: float, radius: float, x0: np.ndarray, iters: int = 30
) -> np.ndarray:
    """Lower bound on max_{‖x‖≤R} KL(π_ref‖π_θ) by projected gradient ascent from starts x0 (..., m, d).

    Normalised steps projected onto the ball, with a per-start step length that grows ×1.5 after an
    accepted step and shrinks ×0.3 after a rejected one (a step is kept only if it raises KL), so the result
    is ≥ the KL at the starts. Returns (...), the max over starts. For the reverse direction KL(π_θ‖π_ref)
    call with (W₀ + ΔW, −ΔW).
    """
    x = x0.copy()
    best, g = _kl_input_grad(W0, dW, x, tau)
    step = np.full(best.shape, 0.5 * radius)
    for _ in range(iters):
        gn = np.linalg.norm(g, axis=-1, keepdims=True)
        cand = x + step[..., None] * g / np.maximum(gn, 1e-300)
        cand *= np.minimum(1.0, radius / np.maximum(np.linalg.norm(cand, axis=-1, keepdims=True), 1e-300))
        val, g_c = _kl_input_grad(W0, dW, cand, tau)
        up = val > best
        x = np.where(up[..., None], cand, x)
        g = np.where(up[..., None], g_c, g)
        best = np.where(up, val, best)
        step = np.where(up, np.minimum(1.5 * step, radius), 0.3 * step)
    return np.max(best, axis=-1)


# ---------------------------------------------------------------- GRPO loss and exact gradients
def grpo_advantages(rewards: np.ndarray, ddof: int = 1, eps: float = 1e-8) -> np.ndarray:
    """(r − mean) / max(std, eps) over the last axis (the K samples of one context); std with `ddof`."""
    r = np.asarray(rewards, dtype=float)
    if r.shape[-1] < 1 + ddof:
        raise ValueError(
            f"need >= {1 + ddof} samples per context for std with ddof={ddof}, got {r.shape[-1]}"
        )
    return (r - r.mean(axis=-1, keepdims=True)) / np.maximum(r.std(axis=-1, ddof=ddof, keepdims=True), eps)


def loss_and_grads(
    W0: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    tau: float,
    x: np.ndarray,
    actions: np.ndarray,
    adv: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GRPO loss per seed and its exact gradients w.r.t. A and B.

    Shapes: W0 (..., V, d), A (..., r, d), B (..., V, r), x (..., N, d), actions / adv (..., N, K); leading
    axes broadcast. `scale` is a float or an array broadcasting against (..., 1, 1) (one s per element).
    Returns loss (...), ∂L/∂A (..., r, d), ∂L/∂B (..., V, r) and G = ∂L/∂(W₀ + sBA) (..., V, d).
    """
    n, k = actions.shape[-2:]
    V = W0.shape[1]
    u = x @ W0.swapaxes(-1, -2) + scale * ((x @ A.swapaxes(-1, -2)) @ B.swapaxes(-1, -2))  # (..., N, V)
    logpi = log_softmax(u / tau)
    onehot = actions[..., None] == np.arange(V)  # (..., N, K, V)
    logp_a = np.sum(np.where(onehot, logpi[..., None, :], 0.0), axis=-1)  # (..., N, K)
    loss = -np.mean(adv * logp_a, axis=(-2, -1))
    p = np.exp(logpi)
    # ∂L/∂u_i = −(1/(N K τ)) Σ_k A_ik (e_{a_ik} − π_i)
    dldu = -np.sum(adv[..., None] * (onehot - p[..., None, :]), axis=-2) / (n * k * tau)  # (..., N, V)
    G = dldu.swapaxes(-1, -2) @ x  # (..., V, d)
    gB = scale * (G @ A.swapaxes(-1, -2))  # (..., V, r)
    gA = scale * (B.swapaxes(-1, -2) @ G)  # (..., r, d)
    return loss, gA, gB, G


def clip_coefficient(total_norm: np.ndarray, max_norm: float | None) -> np.ndarray:
    """torch.nn.utils.clip_grad_norm_: min(1, max_norm / (total_norm + 1e-6)); 1 when max_norm is None."""
    if max_norm is None:
        return np.ones_like(total_norm)
    return np.minimum(1.0, max_norm / (total_norm + 1e-6))


def adam_update(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One torch.optim.Adam / AdamW step (foreach = single-tensor math), `step` ≥ 1. Returns (param, m, v).

    AdamW (decoupled): param ← param·(1 − lr·λ); Adam: grad ← grad + λ·param. Then
    m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  param ← param − (lr/(1−β1^t)) · m / (√v/√(1−β2^t) + ε).
    """
    b1, b2 = betas
    if decoupled:
        param = param * (1.0 - lr * weight_decay)
    elif weight_decay:
        grad = grad + weight_decay * param
    m = b1 * m + (1.0 - b1) * grad
    v = b2 * v + (1.0 - b2) * grad * grad
    denom = np.sqrt(v) / np.sqrt(1.0 - b2**step) + eps
    return param - (lr / (1.0 - b1**step)) * m / denom, m, v


# ---------------------------------------------------------------- run specification
@dataclass(frozen=True)
class BanditSpec:
    """One single-layer LoRA GRPO run; the hyper-parameter fields mirror theory.schema.BoundInputs.

    ``grad_clip`` None means no clipping (allowed for Adam; "sgd" needs a clip for the a-priori bound).
    ``w0_scale`` is the std of the reference logits W₀x (before τ) for ‖x‖ = R; 0 gives a uniform π_ref.
    """

    vocab_size: int = 2
    in_features: int = 64
    rank: int = 4
    alpha: float = 8.0
    scaling: str = "alpha/r"
    optimizer: str = "adamw"
    lr: float = 1e-3
    steps: int = 20
    schedule: str = "constant"
    warmup: int = 0
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    temperature: float = 1.0
    input_radius: float = 1.0
    contexts_per_step: int = 32
    samples_per_context: int = 8
    w0_scale: float = 0.0
    n_eval: int = 256
    adv_ddof: int = 1

    def __post_init__(self) -> None:
        self.bound_inputs()  # validates every shared field (ValueError naming the accepted values)
        object.__setattr__(self, "optimizer", OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer))
        if self.contexts_per_step < 1 or self.n_eval < 1:
            raise ValueError("contexts_per_step and n_eval must be integers >= 1")
        if self.samples_per_context < 1 + self.adv_ddof:
            raise ValueError(
                f"samples_per_context must be >= {1 + self.adv_ddof} (std with ddof={self.adv_ddof})"
            )
        if not self.w0_scale >= 0:
            raise ValueError(f"w0_scale (std of the reference logits) must be >= 0, got {self.w0_scale!r}")

    @property
    def scale(self) -> float:
        return float(lora_scale(self.scaling, self.alpha, self.rank))

    def bound_inputs(self, a0_norm: float | None = None) -> BoundInputs:
        """The a-priori bound's input for this run (a0_norm = realised ‖A₀‖₂ if given)."""
        return BoundInputs(
            vocab_size=self.vocab_size,
            in_features=self.in_features,
            rank=self.rank,
            alpha=self.alpha,
            lr=self.lr,
            steps=self.steps,
            input_radius=self.input_radius,
            scaling=self.scaling,
            optimizer=self.optimizer,
            schedule=self.schedule,
            warmup=self.warmup,
            grad_clip=self.grad_clip,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            temperature=self.temperature,
            a0_norm=a0_norm,
        )


@dataclass
class BanditRun:
    """Measurements of one spec over S seeds (arrays have leading axis S)."""

    spec: BanditSpec
    seeds: np.ndarray
    a0_norm: np.ndarray  # (S,) realised ‖A₀‖₂
    track_steps: np.ndarray  # (P,) optimiser steps after which the eval-set KL was measured
    kl_ref_theta: np.ndarray  # (S, P) max over eval contexts of KL(π_ref‖π_θ)
    kl_theta_ref: np.ndarray  # (S, P) max over eval contexts of KL(π_θ‖π_ref)
    # (S,) final max over the ball ‖x‖ ≤ R: eval-set maximisers refined by projected gradient ascent (≥ eval max)
    ball_kl_ref_theta: np.ndarray
    ball_kl_theta_ref: np.ndarray  # (S,)
    mean_kl_ref_theta: np.ndarray  # (S,) final, mean over eval contexts of KL(π_ref‖π_θ)
    eval_range: np.ndarray  # (S,) final max over eval contexts of range(z)/τ
    grad_norm: np.ndarray  # (S, T) global grad norm of (A, B) before clipping
    # (S,) ‖Σ_t G_t‖_F / Σ_t ‖G_t‖_F ∈ [0, 1]; 1 = every step's ∂L/∂W points the same way
    grad_coherence: np.ndarray
    a_drift: np.ndarray  # (S,) ‖A_T − A₀‖_F / ‖A₀‖_F
    mean_reward: np.ndarray  # (S, T)
    B: np.ndarray = field(repr=False)  # (S, V, r) final
    A: np.ndarray = field(repr=False)  # (S, r, d) final
    W0: np.ndarray = field(repr=False)  # (S, V, d)


def _streams(seed: int) -> list[np.random.Generator]:
    return [np.random.default_rng(np.random.SeedSequence([int(seed), k])) for k in range(5)]


def _sphere(rng: np.random.Generator, shape: tuple[int, ...], radius: float) -> np.ndarray:
    """Uniform on the sphere ‖x‖ = R, shape (..., d); one draw (the same numbers as successive draws)."""
    x = rng.standard_normal(shape)
    return radius * x / np.linalg.norm(x, axis=-1, keepdims=True)


def simulate(spec: BanditSpec, seeds: Sequence[int], **kw: int) -> BanditRun:
    """Train `spec` on every seed and measure KL to π_ref; see simulate_ranks (keywords pass through)."""
    return simulate_ranks(spec, seeds, [spec.rank], [spec.alpha], **kw)[0]


def simulate_ranks(
    spec: BanditSpec,
    seeds: Sequence[int],
    ranks: Sequence[int],
    alphas: Sequence[float],
    *,
    track_every: int = 0,
    ball_starts: int = 4,
    ball_iters: int = 30,
) -> list[BanditRun]:
    """Train the LoRA adapter for `spec.steps` GRPO steps, for every (rank, alpha) pair and every seed.

    The ranks share each step's contexts and sampling uniforms (drawn once per seed and step), so a seed's
    runs at different ranks are paired. Contexts are drawn fresh each step, uniform on the sphere ‖x‖ = R;
    KL is measured on `spec.n_eval` fixed evaluation contexts (same law) after every `track_every` steps
    (0: only at the end), and at the end also over the ball ‖x‖ ≤ R by gradient ascent from the
    `ball_starts` worst evaluation contexts. Returns one BanditRun per rank.
    """
    if len(seeds) < 1:
        raise ValueError("seeds must be a non-empty sequence of integers")
    if len(ranks) != len(alphas) or len(ranks) < 1:
        raise ValueError("ranks and alphas must be non-empty sequences of the same length")
    specs = [replace(spec, rank=int(r), alpha=float(a)) for r, a in zip(ranks, alphas, strict=True)]
    nr, S, V, d = len(specs), len(seeds), spec.vocab_size, spec.in_features
    N, K, T, rmax = spec.contexts_per_step, spec.samples_per_context, spec.steps, max(ranks)
    tau, R = spec.temperature, spec.input_radius
    scales = [sp_.scale for sp_ in specs]
    streams = [_streams(sd) for sd in seeds]
    W_star = np.stack([g[0].standard_normal((V, d)) for g in streams])  # (S, V, d)
    W0 = np.stack([g[0].standard_normal((V, d)) for g in streams]) * (spec.w0_scale / max(R, 1e-300))
    bound = 1.0 / np.sqrt(d)
    A_full = np.stack([g[1].uniform(-bound, bound, size=(rmax, d)) for g in streams])  # (S, rmax, d)
    A0 = [A_full[:, : sp_.rank].copy() for sp_ in specs]  # first r rows: this seed's rank-r init (S, r, d)
    X_eval = np.stack([_sphere(g[2], (spec.n_eval, d), R) for g in streams])  # (S, M, d)
    X_all = np.stack([_sphere(g[3], (T, N, d), R) for g in streams], axis=1)  # (T, S, N, d), all steps
    U_all = np.stack([g[4].random((T, N, K)) for g in streams], axis=1)  # (T, S, N, K)
    A = [a.copy() for a in A0]
    B = [np.zeros((S, V, sp_.rank)) for sp_ in specs]
    opt_state = [
        [np.zeros_like(A[i]), np.zeros_like(A[i]), np.zeros_like(B[i]), np.zeros_like(B[i])]
        for i in range(nr)
    ]
    lam = lr_multipliers(spec.schedule, T, spec.warmup)
    a_ref = X_eval @ W0.swapaxes(-1, -2) / tau  # (S, M, V)

    def eval_kl(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = scales[i] * ((X_eval @ A[i].swapaxes(-1, -2)) @ B[i].swapaxes(-1, -2)) / tau  # (S, M, V)
        f, b = kl_pair(a_ref, z)
        return f, b, np.max(z, axis=-1) - np.min(z, axis=-1)

    track, kf, kb = [0], [np.zeros((nr, S))], [np.zeros((nr, S))]
    gnorm, reward = np.zeros((nr, S, T)), np.zeros((nr, S, T))
    G_sum, G_abs = np.zeros((nr, S, V, d)), np.zeros((nr, S))
    for t in range(T):
        x, U = X_all[t], U_all[t]  # (S, N, d), (S, N, K)
        best = np.argmax(x @ W_star.swapaxes(-1, -2), axis=-1)  # teacher's action (S, N)
        base = x @ W0.swapaxes(-1, -2)  # (S, N, V)
        lr_t = spec.lr * lam[t]
        for i in range(nr):
            u = base + scales[i] * ((x @ A[i].swapaxes(-1, -2)) @ B[i].swapaxes(-1, -2))  # (S, N, V)
            cdf = np.cumsum(np.exp(log_softmax(u / tau)), axis=-1)
            actions = np.minimum(np.sum(U[..., None] > cdf[..., None, :], axis=-1), V - 1)  # inverse CDF
            rewards = (actions == best[..., None]).astype(float)  # (S, N, K)
            reward[i, :, t] = rewards.mean(axis=(-2, -1))
            adv = grpo_advantages(rewards, ddof=spec.adv_ddof)
            _, gA, gB, G = loss_and_grads(W0, A[i], B[i], scales[i], tau, x, actions, adv)
            G_sum[i] += G
            G_abs[i] += np.linalg.norm(G, axis=(-2, -1))
            norm = np.sqrt(np.sum(gA**2, axis=(-2, -1)) + np.sum(gB**2, axis=(-2, -1)))  # (S,)
            gnorm[i, :, t] = norm
            coef = clip_coefficient(norm, spec.grad_clip)[:, None, None]
            gA, gB = gA * coef, gB * coef
            if spec.optimizer == "sgd":  # torch SGD, momentum 0: p ← p − lr (g + λ p)
                A[i] = A[i] - lr_t * (gA + spec.weight_decay * A[i])
                B[i] = B[i] - lr_t * (gB + spec.weight_decay * B[i])
            else:
                mA, vA, mB, vB = opt_state[i]
                args = (t + 1, lr_t, spec.betas, spec.eps, spec.weight_decay, spec.optimizer == "adamw")
                A[i], mA, vA = adam_update(A[i], gA, mA, vA, *args)
                B[i], mB, vB = adam_update(B[i], gB, mB, vB, *args)
                opt_state[i] = [mA, vA, mB, vB]
        if track_every and (t + 1) % track_every == 0 and t + 1 < T:
            track.append(t + 1)
            kf.append(np.zeros((nr, S)))
            kb.append(np.zeros((nr, S)))
            for i in range(nr):
                f, b, _ = eval_kl(i)
                kf[-1][i], kb[-1][i] = f.max(axis=-1), b.max(axis=-1)
    track.append(T)
    kf.append(np.zeros((nr, S)))
    kb.append(np.zeros((nr, S)))
    runs = []
    m = min(ball_starts, spec.n_eval)
    for i, sp_ in enumerate(specs):
        f, b, z_range = eval_kl(i)
        kf[-1][i], kb[-1][i] = f.max(axis=-1), b.max(axis=-1)
        dW = scales[i] * (B[i] @ A[i])  # (S, V, d)
        starts_f = np.take_along_axis(X_eval, np.argsort(-f, axis=-1)[..., :m, None], axis=-2)  # (S, m, d)
        starts_b = np.take_along_axis(X_eval, np.argsort(-b, axis=-1)[..., :m, None], axis=-2)
        ball_f = np.maximum(ball_max_kl(W0, dW, tau, R, starts_f, ball_iters), kf[-1][i])
        ball_b = np.maximum(ball_max_kl(W0 + dW, -dW, tau, R, starts_b, ball_iters), kb[-1][i])
        a0n = np.sqrt(np.maximum(np.linalg.eigvalsh(A0[i] @ A0[i].swapaxes(-1, -2))[:, -1], 0.0))  # ‖A₀‖₂
        runs.append(
            BanditRun(
                spec=sp_,
                seeds=np.asarray(seeds),
                a0_norm=a0n,
                track_steps=np.asarray(track),
                kl_ref_theta=np.stack([k[i] for k in kf], axis=-1),
                kl_theta_ref=np.stack([k[i] for k in kb], axis=-1),
                ball_kl_ref_theta=ball_f,
                ball_kl_theta_ref=ball_b,
                mean_kl_ref_theta=f.mean(axis=-1),
                eval_range=np.max(z_range, axis=-1),
                grad_norm=gnorm[i],
                grad_coherence=np.linalg.norm(G_sum[i], axis=(-2, -1)) / np.maximum(G_abs[i], 1e-300),
                a_drift=np.linalg.norm(A[i] - A0[i], axis=(-2, -1)) / np.linalg.norm(A0[i], axis=(-2, -1)),
                mean_reward=reward[i],
                B=B[i],
                A=A[i],
                W0=W0,
            )
        )
    return runs


# ---------------------------------------------------------------- measured KL vs the a-priori bound
def check_run_bounds(run: BanditRun) -> dict[str, Any]:
    """Compare one run's measured KL with the a-priori bound (theory/apriori.py A6/A7), per seed.

    Bounds use the realised ‖A₀‖₂ (the sharpest valid input) and the tracked step counts, so the eval-set
    KL after t steps is compared with the bound after t steps. At the end the ball maximum (gradient ascent)
    is compared too, and the exact ball maximum of the logit range, R·D(ΔW)/τ (theory/aposteriori.py P1),
    with the a-priori range bound ρ. Returns arrays over seeds: `measured` (final ball KL, max of the two
    directions), `bound` (final KL bound), `ratio` = measured/bound, `range_ratio` = exact range / ρ,
    `rel_margin` = 1 − max ratio over every compared pair (steps ≥ 1, both directions, range), and `holds`.
    A NaN measurement or bound is a failure (`holds` False, margin −inf), never read as 0.
    """
    spec, S = run.spec, run.seeds.size
    # A t-step run of "linear"/"cosine" has different multipliers than the first t steps of a T-step run
    # (HF decays to 0 at the run's own end), and apriori takes no "elapsed steps" input: for those schedules
    # every tracked step is compared with the end-of-run bound (valid: partial lr sums ≤ the full sums and the
    # bound increases with them). For "constant"/"constant_with_warmup" the t-step bound is exact.
    prefix = spec.schedule in ("constant", "constant_with_warmup")
    steps = run.track_steps if prefix else np.full_like(run.track_steps, spec.steps)
    b = apriori.apriori_kl_bound_array(
        spec.bound_inputs(), a0_norm=run.a0_norm[:, None], steps=steps[None, :]
    )  # each (S, P)
    fwd, bwd = b["kl_ref_theta"] * np.ones((S, 1)), b["kl_theta_ref"] * np.ones((S, 1))
    exact_range = np.array(
        [
            aposteriori.lora_row_diameter(run.B[i], run.A[i], spec.scale)[0]
            * spec.input_radius
            / spec.temperature
            for i in range(S)
        ]
    )
    rho = (b["logit_range"] * np.ones((S, 1)))[:, -1]
    later = run.track_steps >= 1  # after 0 steps bound and KL are both exactly 0
    pairs = [
        _ratio(run.kl_ref_theta[:, later], fwd[:, later]),
        _ratio(run.kl_theta_ref[:, later], bwd[:, later]),
        _ratio(run.ball_kl_ref_theta, fwd[:, -1])[:, None],
        _ratio(run.ball_kl_theta_ref, bwd[:, -1])[:, None],
        _ratio(exact_range, rho)[:, None],
    ]
    # A NaN ratio (a NaN measurement or bound) is a failure: it counts as +inf, never as 0.
    all_pairs = np.concatenate(pairs, axis=1)
    worst = np.max(np.where(np.isnan(all_pairs), np.inf, all_pairs), axis=1)
    measured = np.maximum(run.ball_kl_ref_theta, run.ball_kl_theta_ref)  # NaN if either is NaN
    bound = np.minimum(fwd[:, -1], bwd[:, -1])
    return {
        "measured": measured,
        "bound": bound,
        "ratio": _ratio(measured, bound),  # NaN stays NaN
        "range_ratio": _ratio(exact_range, rho),
        "rel_margin": 1.0 - worst,
        "abs_margin": bound - measured,
        "holds": bool(np.all(worst <= 1.0)),
    }


def _ratio(measured: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """measured / bound, with 0/0 = 0 (nothing moved, nothing allowed: holds), x/0 = inf for x > 0, and NaN
    wherever either side is NaN (never mapped to a number: `check_run_bounds` counts it as a failure)."""
    m, b = np.broadcast_arrays(np.asarray(measured, dtype=float), np.asarray(bound, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = m / b
    return np.where((m == 0) & (b == 0), 0.0, r)
