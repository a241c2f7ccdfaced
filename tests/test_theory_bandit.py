"""Single-layer LoRA GRPO simulator (theory/bandit.py): gradients, optimiser steps, advantages, exact KL."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from theory import aposteriori
from theory.bandit import (
    BanditSpec,
    adam_update,
    ball_max_kl,
    check_run_bounds,
    clip_coefficient,
    grpo_advantages,
    kl_pair,
    loss_and_grads,
    simulate,
    simulate_ranks,
)
from theory.softmax_kl import kl_ref_theta, kl_theta_ref


def _instance(seed: int = 0):
    rng = np.random.default_rng(seed)
    S, V, d, r, N, K = 2, 4, 5, 3, 3, 4
    W0 = rng.normal(size=(S, V, d))
    A = rng.normal(size=(S, r, d))
    B = rng.normal(size=(S, V, r))
    x = rng.normal(size=(S, N, d))
    actions = rng.integers(0, V, size=(S, N, K))
    adv = rng.normal(size=(S, N, K))  # not zero-mean per group: exercises the −π_i term of ∂L/∂u too
    return W0, A, B, x, actions, adv


def test_gradients_match_central_finite_differences():
    W0, A, B, x, actions, adv = _instance()
    s, tau, h = 0.7, 1.3, 1e-6
    _, gA, gB, _ = loss_and_grads(W0, A, B, s, tau, x, actions, adv)
    for P, g in ((A, gA), (B, gB)):
        fd = np.zeros_like(P)
        for idx in np.ndindex(P.shape):
            old = P[idx]
            P[idx] = old + h
            lp = loss_and_grads(W0, A, B, s, tau, x, actions, adv)[0][idx[0]]
            P[idx] = old - h
            lm = loss_and_grads(W0, A, B, s, tau, x, actions, adv)[0][idx[0]]
            P[idx] = old
            fd[idx] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_loss_is_minus_mean_advantage_times_logprob_by_hand():
    # one seed, one context, V = 2, W0 = 0, B = 0: π = (½, ½), so L = −mean(A)·log ½
    W0, A, B = np.zeros((1, 2, 3)), np.ones((1, 1, 3)), np.zeros((1, 2, 1))
    x = np.ones((1, 1, 3))
    adv = np.array([[[1.0, -0.5, 0.25]]])
    loss = loss_and_grads(W0, A, B, 1.0, 1.0, x, np.array([[[0, 1, 1]]]), adv)[0]
    assert loss[0] == pytest.approx(-(1.0 - 0.5 + 0.25) / 3 * math.log(0.5))


def test_grpo_advantages_by_hand():
    adv = grpo_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    # group 1: mean ½, Bessel std = sqrt(4·¼/3) = 1/√3 → ±(½)·√3
    np.testing.assert_allclose(
        adv[0], [math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2]
    )
    # group 2: std 0 → max(0, 1e-8) and r − mean = 0 → zero advantages (no gradient)
    np.testing.assert_array_equal(adv[1], 0.0)
    # group 3: mean ¼, std = sqrt((9/16 + 3/16)/3) = ½ → (¾)/½ = 1.5 and (−¼)/½ = −0.5
    np.testing.assert_allclose(adv[2], [1.5, -0.5, -0.5, -0.5])
    np.testing.assert_allclose(grpo_advantages(np.array([1.0, 0.0]), ddof=0), [1.0, -1.0])


def test_adamw_two_steps_by_hand_and_against_torch():
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-8, 0.01
    grads = [0.5, -0.2]
    p, m, v = np.array([1.0]), np.zeros(1), np.zeros(1)
    for t, g in enumerate(grads, start=1):
        p, m, v = adam_update(p, np.array([g]), m, v, t, lr, (b1, b2), eps, wd, decoupled=True)
    # by hand, torch.optim.AdamW: decay, moments, bias corrections
    p1 = 1.0 * (1 - lr * wd)
    m1, v1 = (1 - b1) * 0.5, (1 - b2) * 0.25
    p1 -= lr / (1 - b1) * m1 / (math.sqrt(v1) / math.sqrt(1 - b2) + eps)
    p2 = p1 * (1 - lr * wd)
    m2, v2 = b1 * m1 + (1 - b1) * (-0.2), b2 * v1 + (1 - b2) * 0.04
    p2 -= lr / (1 - b1**2) * m2 / (math.sqrt(v2) / math.sqrt(1 - b2**2) + eps)
    assert p[0] == pytest.approx(p2, rel=1e-12, abs=1e-15)
    # and torch itself, for both AdamW (decoupled) and Adam (L2 added to the gradient)
    for decoupled, cls in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        opt = cls([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        q, mq, vq = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
        for t, g in enumerate([[0.5, 0.3], [-0.2, 0.7]], start=1):
            w.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
            q, mq, vq = adam_update(q, np.array(g), mq, vq, t, lr, (b1, b2), eps, wd, decoupled)
        np.testing.assert_allclose(q, w.detach().numpy(), rtol=1e-12)


def test_clip_coefficient_matches_torch_clip_grad_norm():
    for norm_scale, max_norm in ((3.0, 1.0), (0.2, 1.0)):
        g = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) * norm_scale / 3.0
        p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p], max_norm)
        coef = clip_coefficient(np.array([norm_scale]), max_norm)[0]
        np.testing.assert_allclose(g.numpy() * coef, p.grad.numpy(), rtol=1e-14)


def test_kl_pair_matches_lse_form_and_stays_accurate_for_tiny_shifts():
    rng = np.random.default_rng(1)
    a, z = rng.normal(size=(6, 7)) * 2, rng.normal(size=(6, 7))
    f, b = kl_pair(a, z)
    np.testing.assert_allclose(f, kl_ref_theta(a, z), rtol=1e-10)
    np.testing.assert_allclose(b, kl_theta_ref(a, z), rtol=1e-10)
    # tiny shift: KL = ½ Var_p(z) + O(z³) in both directions (the lse form has only ~1e-16 absolute accuracy)
    zt = z * 1e-7
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    half_var = 0.5 * (np.sum(p * zt**2, -1) - np.sum(p * zt, -1) ** 2)
    f, b = kl_pair(a, zt)
    np.testing.assert_allclose(f, half_var, rtol=1e-6)
    np.testing.assert_allclose(b, half_var, rtol=1e-6)
    # huge shift: finite and equal to the lse form
    f, _ = kl_pair(a, 200 * z)
    np.testing.assert_allclose(f, kl_ref_theta(a, 200 * z), rtol=1e-9)


def test_ball_ascent_finds_the_exact_maximum_for_two_actions():
    # V = 2, W0 = 0: KL(π_ref‖π_θ) = log cosh(Δz/2) with Δz = (ΔW₀ − ΔW₁)·x/τ, maximised over the ball at
    # range ρ = R‖ΔW₀ − ΔW₁‖/τ (aposteriori P1)
    rng = np.random.default_rng(2)
    d, R, tau = 16, 3.0, 0.7
    B, A = rng.normal(size=(2, 3)) * 0.1, rng.normal(size=(3, d)) / 4
    dW = (B @ A)[None]
    x0 = rng.normal(size=(1, 2, d))
    x0 *= R / np.linalg.norm(x0, axis=-1, keepdims=True)
    got = ball_max_kl(np.zeros((1, 2, d)), dW, tau, R, x0, iters=60)[0]
    rho = aposteriori.aposteriori_kl_bound(B=B, A=A, scale=1.0, input_radius=R, temperature=tau)[
        "logit_range"
    ]
    assert got == pytest.approx(math.log(math.cosh(rho / 2)), rel=1e-6)


SPEC = BanditSpec(vocab_size=3, in_features=12, rank=2, alpha=4.0, optimizer="adamw", lr=0.01, steps=4)


def test_ranks_share_seeds_and_nest_the_init():
    runs = simulate_ranks(replace(SPEC, steps=0), [0, 1], [2, 4], [4.0, 8.0])
    np.testing.assert_array_equal(runs[0].A, runs[1].A[:, :2])  # rank-2 A₀ = first rows of rank-4 A₀
    # a rank's result does not depend on which other ranks share the batch
    joint = simulate_ranks(SPEC, [3, 4], [1, 2], [2.0, 4.0])[1]
    alone = simulate(SPEC, [3, 4])
    np.testing.assert_allclose(joint.kl_ref_theta, alone.kl_ref_theta, rtol=1e-12)
    np.testing.assert_allclose(joint.B, alone.B, rtol=1e-12)


def test_sgd_without_clipping_moves_b_by_minus_lr_times_gradient_once():
    spec = replace(SPEC, optimizer="sgd", grad_clip=1e9, steps=1, lr=0.3)
    run = simulate(spec, [5])
    # step 1: B₀ = 0 so ∂L/∂A = 0 and A is unchanged; B₁ = −lr ∂L/∂B, and ∂L/∂B ≠ 0
    assert run.a_drift[0] == 0.0
    assert np.abs(run.B).max() > 0


def test_clipped_sgd_one_step_is_nearly_tight_against_the_apriori_bound():
    # clip active, one step: B moves by exactly lr·c along A₀g/‖A₀g‖; the a-priori range bound (apriori A6)
    # is then loose only by ‖A₀ᵀu‖/‖A₀‖₂ ≤ 1 (theory/rank_scaling.md §7)
    spec = BanditSpec(vocab_size=2, in_features=64, rank=4, alpha=8.0, optimizer="sgd", lr=0.5, steps=1,
                      grad_clip=1e-3, input_radius=8.0)  # fmt: skip
    res = check_run_bounds(simulate(spec, [0, 1, 2]))
    assert res["holds"]
    assert np.all(res["range_ratio"] <= 1.0) and np.all(res["range_ratio"] > 0.5)


def test_bounds_hold_on_a_late_phase_run_with_a_decaying_schedule():
    spec = replace(SPEC, steps=25, lr=0.05, schedule="cosine", warmup=3, w0_scale=2.0, input_radius=3.0)
    res = check_run_bounds(simulate(spec, [0, 1], track_every=1))
    assert res["holds"] and np.all(res["ratio"] > 0) and np.all(res["ratio"] <= 1)


@pytest.mark.parametrize("field", ["kl_ref_theta", "kl_theta_ref", "ball_kl_ref_theta", "ball_kl_theta_ref"])
def test_a_nan_measurement_fails_the_bound_check(field):
    # A NaN KL (e.g. an overflow in the simulator) must be a failure, never read as 0 and reported as "holds".
    run = simulate(replace(SPEC, steps=2), [0, 1], track_every=1)
    assert check_run_bounds(run)["holds"]
    values = getattr(run, field).copy()
    values[1, ...] = np.nan  # seed 1; every tracked step for the per-step measures
    res = check_run_bounds(replace(run, **{field: values}))
    assert res["holds"] is False
    assert res["rel_margin"][1] == -np.inf and res["rel_margin"][0] > 0  # seed 0 is untouched
    if field.startswith("ball"):
        assert np.isnan(res["measured"][1]) and np.isnan(res["ratio"][1])


def test_zero_over_zero_is_zero_but_kl_over_a_zero_bound_fails():
    # lr = 0: nothing moves and the bound is exactly 0, so 0/0 is "holds" (ratio 0), not NaN
    still = check_run_bounds(simulate(replace(SPEC, lr=0.0, steps=2), [0]))
    assert still["holds"] and still["ratio"][0] == 0.0
    run = simulate(replace(SPEC, lr=0.0, steps=2), [0])
    moved = replace(run, ball_kl_ref_theta=np.array([1e-3]))
    assert check_run_bounds(moved)["holds"] is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of 'sgd', 'adam', 'adamw'"),
        ({"scaling": "alpha/r^2"}, "scaling must be one of 'alpha/r', 'rslora', 'const'"),
        ({"samples_per_context": 1}, "samples_per_context must be >= 2"),
        ({"w0_scale": -1.0}, "w0_scale"),
    ],
)
def test_bad_spec_raises_value_error_naming_accepted_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        replace(SPEC, **kwargs)


def test_simulate_rejects_empty_seed_list():
    with pytest.raises(ValueError, match="seeds"):
        simulate(SPEC, [])
