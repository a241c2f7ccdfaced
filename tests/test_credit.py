"""Token credit (arca_lab.credit): hand examples per rule, normalisation edge cases, estimator identity."""

import math

import pytest
import torch

from arca_lab.credit import (
    CREDITS,
    aggregate_layers,
    compute_credit_weights,
    divergence_scores,
    entropy_reduction_scores,
    normalize_scores,
    residual_scores,
    surprisal_scores,
    token_advantages,
)

MASK = torch.tensor([[1, 1, 1, 0]])  # one row, three valid tokens, right padding


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


# ---------------------------------------------------------------- normalize_scores


def test_normalize_hand_vector():
    scores = torch.tensor([[1.0, 3.0, 0.0, 5.0]])  # the 5.0 sits on padding and must be ignored
    # eps = 0, p = 1: w = [1, 3, 0] / 4
    assert close(normalize_scores(scores, MASK, eps=0.0), [[0.25, 0.75, 0.0, 0.0]])
    # eps = 0, p = 2: [1, 9, 0] / 10
    assert close(normalize_scores(scores, MASK, sharpening=2.0, eps=0.0), [[0.1, 0.9, 0.0, 0.0]])
    # eps = 0.5, p = 1: [1.5, 3.5, 0.5] / 5.5
    assert close(normalize_scores(scores, MASK, eps=0.5), [[1.5 / 5.5, 3.5 / 5.5, 0.5 / 5.5, 0.0]])
    # eps = 0.5, p = 2: [2.25, 12.25, 0.25] / 14.75
    expected = [[2.25 / 14.75, 12.25 / 14.75, 0.25 / 14.75, 0.0]]
    assert close(normalize_scores(scores, MASK, sharpening=2.0, eps=0.5), expected)


def test_normalize_clamps_negative_and_ignores_nan_padding():
    scores = torch.tensor([[-2.0, 1.0, 3.0, math.nan]])  # −2 → 0; NaN on padding
    assert close(normalize_scores(scores, MASK, eps=0.0), [[0.0, 0.25, 0.75, 0.0]])


def test_normalize_uniform_fallback_and_empty_row():
    scores = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    w = normalize_scores(scores, mask, eps=0.0)  # row 0: Σ = 0 ≤ 0 → uniform 1/3; row 1: no valid token → 0
    assert close(w, [[1 / 3, 1 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert not torch.isnan(w).any()
    # Default eps with p = 2: Σ (1e-8)² = 3e-16 ≤ 1e-8 → fallback, still uniform.
    assert close(normalize_scores(scores, mask, sharpening=2.0), [[1 / 3, 1 / 3, 1 / 3, 0.0], [0.0] * 4])


def test_normalize_rows_sum_to_one_on_random_masks():
    g = torch.Generator().manual_seed(0)
    B, T = 16, 9
    scores = torch.rand(B, T, generator=g) * 5 - 1  # some negative
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0] = False  # an empty row
    for p in (0.5, 1.0, 2.0):
        w = normalize_scores(scores, mask, sharpening=p)
        sums = w.sum(-1)
        assert close(sums[mask.any(-1)], torch.ones(int(mask.any(-1).sum())), tol=1e-5)
        assert float(sums[0]) == 0.0
        assert (w[~mask] == 0).all() and (w >= 0).all()


@pytest.mark.parametrize("kwargs", [{"sharpening": 0.0}, {"sharpening": -1.0}, {"eps": -1e-3}])
def test_normalize_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        normalize_scores(torch.ones(1, 4), MASK, **kwargs)


# ---------------------------------------------------------------- raw scores


def test_entropy_reduction_right_padding():
    H = torch.tensor([[2.0, 1.5, 1.7, 0.2, 9.9], [1.0, 0.4, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    # row 0: 2.0−1.5 = 0.5; 1.5→1.7 increases → 0; 1.7−0.2 = 1.5; last valid → 0; padding → 0
    # row 1: 1.0−0.4 = 0.6; last valid → 0 (not 0.4−0.0 against the padding entropy)
    expected = [[0.5, 0.0, 1.5, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0, 0.0]]
    assert close(entropy_reduction_scores(H, mask), expected)


def test_entropy_reduction_non_contiguous_mask_uses_next_valid():
    H = torch.tensor([[3.0, 0.1, 1.0, 0.5, 0.0]])
    mask = torch.tensor([[True, False, True, True, False]])
    # t=0 → next valid t=2: 3.0−1.0 = 2.0; t=2 → t=3: 0.5; t=3 last valid → 0
    assert close(entropy_reduction_scores(H, mask), [[2.0, 0.0, 0.5, 0.0, 0.0]])


def test_elementary_scores_by_hand():
    logps = torch.log(torch.tensor([[0.5, 0.25, 1.0]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert close(surprisal_scores(logps), [[math.log(2), math.log(4), 0.0]])
    assert close(divergence_scores(logps, ref), [[math.log(2), 0.0, math.log(2)]])
    h_a = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [2.0, 0.0]]])
    h_b = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
    assert close(residual_scores(h_a, h_b), [[5.0, 0.0, 1.0]])
    assert residual_scores(h_a.to(torch.bfloat16), h_b.to(torch.bfloat16)).dtype == torch.float32


def test_aggregate_layers_by_hand():
    s = torch.tensor([[[1.0, 0.0]], [[3.0, 4.0]]])  # (L=2, B=1, T=2)
    assert close(aggregate_layers(s, "mean"), [[2.0, 2.0]])
    assert close(aggregate_layers(s, "max"), [[3.0, 4.0]])
    assert close(aggregate_layers(s, "sum"), [[4.0, 4.0]])
    assert close(aggregate_layers(s, "rms"), [[math.sqrt(5.0), math.sqrt(8.0)]])  # √((1+9)/2), √((0+16)/2)
    with pytest.raises(ValueError, match="mean"):
        aggregate_layers(s, "median")


# ---------------------------------------------------------------- token_advantages


def test_token_advantages_uniform_gives_back_A():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 7, generator=g) < 0.7
    mask[:, 0] = True
    A = torch.randn(6, generator=g)
    w, _ = compute_credit_weights("uniform", completion_mask=mask)
    adv = token_advantages(A, w, mask)
    assert close(adv, torch.where(mask, A[:, None].expand(6, 7), 0.0), tol=1e-6)


def test_token_advantages_hand_2x3():
    A = torch.tensor([2.0, -1.0])
    w = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.8, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: 2 · 3 · w = [3, 1.5, 1.5]; row 1: −1 · 2 · w = [−0.4, −1.6, 0]
    assert close(token_advantages(A, w, mask), [[3.0, 1.5, 1.5], [-0.4, -1.6, 0.0]])


def test_token_advantages_reproduce_arca_gradient_under_grpo_loss():
    """TRL loss_type="grpo" on-policy (ratio = exp(logp − logp.detach())) with A·T·w gives ARCA's gradient."""
    g = torch.Generator().manual_seed(2)
    B, T = 4, 6
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    logps = torch.randn(B, T, generator=g).requires_grad_(True)
    A = torch.randn(B, generator=g)
    w = normalize_scores(torch.rand(B, T, generator=g), mask)
    adv_t = token_advantages(A, w, mask)
    m = mask.float()
    ratio = torch.exp(logps - logps.detach())
    trl_loss = (-(ratio * adv_t) * m).sum(-1).div(m.sum(-1)).mean()  # TRL grpo: per-sequence mean, then mean
    (g_trl,) = torch.autograd.grad(trl_loss, logps)
    arca_loss = -(A * (w * logps * m).sum(-1)).mean()  # authors' code: −(A Σ_t w_t logπ_t).mean()
    (g_arca,) = torch.autograd.grad(arca_loss, logps)
    assert close(g_trl, g_arca, tol=1e-6)


# ---------------------------------------------------------------- compute_credit_weights


def test_each_credit_on_hand_example():
    mask = MASK
    logps = torch.log(torch.tensor([[0.5, 0.25, 1.0, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.5, 0.1]]))
    H = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    kw = {"completion_mask": mask, "eps": 0.0}

    w, s = compute_credit_weights("uniform", **kw)
    assert close(w, [[1 / 3, 1 / 3, 1 / 3, 0.0]]) and close(s, torch.zeros(1, 4))

    w, s = compute_credit_weights("surprisal", per_token_logps=logps, **kw)
    # α = [ln 2, 2 ln 2, 0] → [1/3, 2/3, 0]
    assert close(s, [[math.log(2), math.log(4), 0.0, 0.0]]) and close(w, [[1 / 3, 2 / 3, 0.0, 0.0]])

    w, s = compute_credit_weights("entropy_reduction", entropies=H, **kw)
    # α = [1.0, 0.5, 0 (last valid)] → [2/3, 1/3, 0]
    assert close(s, [[1.0, 0.5, 0.0, 0.0]]) and close(w, [[2 / 3, 1 / 3, 0.0, 0.0]])

    w, s = compute_credit_weights("divergence", per_token_logps=logps, ref_per_token_logps=ref, **kw)
    # α = [ln 2, 0, ln 2] → [1/2, 0, 1/2]
    assert close(w, [[0.5, 0.0, 0.5, 0.0]])

    h_a = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    h_b = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    w, s = compute_credit_weights("arca", h_adapted=h_a, h_base=h_b, **kw)
    # α = [5, 0, 1] → [5/6, 0, 1/6]
    assert close(s, [[5.0, 0.0, 1.0, 0.0]]) and close(w, [[5 / 6, 0.0, 1 / 6, 0.0]])

    norms = torch.tensor([[[1.0, 2.0, 3.0, 7.0]], [[3.0, 2.0, 1.0, 7.0]]])  # (L=2, B=1, T=4)
    w, s = compute_credit_weights("arca_branch", branch_norms=norms, layer_aggregate="mean", **kw)
    # mean over layers = [2, 2, 2] → uniform
    assert close(w, [[1 / 3, 1 / 3, 1 / 3, 0.0]])
    w, s = compute_credit_weights("arca_branch", branch_norms=norms, layer_aggregate="max", **kw)
    # max = [3, 2, 3] → [3/8, 2/8, 3/8]
    assert close(w, [[3 / 8, 2 / 8, 3 / 8, 0.0]])


def test_arca_per_layer_inputs_with_max():
    # (L=2, B=1, T=4, d=2): layer-0 norms [5, 0, 1, ·], layer-1 norms [1, 2, 2, ·] → max = [5, 2, 2]
    base = torch.zeros(2, 1, 4, 2)
    adapted = torch.tensor(
        [
            [[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [8.0, 8.0]]],
            [[[1.0, 0.0], [0.0, 2.0], [2.0, 0.0], [8.0, 8.0]]],
        ]
    )
    w, s = compute_credit_weights(
        "arca", completion_mask=MASK, h_adapted=adapted, h_base=base, layer_aggregate="max", eps=0.0
    )
    assert close(s, [[5.0, 2.0, 2.0, 0.0]]) and close(w, [[5 / 9, 2 / 9, 2 / 9, 0.0]])


def test_arca_scale_invariance():
    """Scaling the adapter's contribution Δh by c scales α uniformly, so w is unchanged (ARCA paper)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, 8, generator=g)
    delta = torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    for p in (1.0, 2.0):
        w1, _ = compute_credit_weights(
            "arca", completion_mask=mask, h_adapted=base + delta, h_base=base, sharpening=p
        )
        w2, _ = compute_credit_weights(
            "arca", completion_mask=mask, h_adapted=base + 7.3 * delta, h_base=base, sharpening=p
        )
        assert close(w1, w2, tol=1e-5)
        assert not close(w1, compute_credit_weights("uniform", completion_mask=mask)[0], tol=1e-2)


def test_missing_inputs_and_unknown_names():
    with pytest.raises(ValueError, match="per_token_logps"):
        compute_credit_weights("surprisal", completion_mask=MASK)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        compute_credit_weights("divergence", completion_mask=MASK, per_token_logps=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="entropies"):
        compute_credit_weights("entropy_reduction", completion_mask=MASK)
    with pytest.raises(ValueError, match="h_base"):
        compute_credit_weights("arca", completion_mask=MASK, h_adapted=torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="branch_norms"):
        compute_credit_weights("arca_branch", completion_mask=MASK)
    with pytest.raises(ValueError, match="arca_branch"):  # the message lists CREDITS
        compute_credit_weights("random", completion_mask=MASK)
    with pytest.raises(ValueError, match="rms"):
        compute_credit_weights("uniform", completion_mask=MASK, layer_aggregate="median")
    with pytest.raises(ValueError, match="shape"):
        compute_credit_weights("surprisal", completion_mask=MASK, per_token_logps=torch.zeros(1, 3))
    assert set(CREDITS) == {"uniform", "surprisal", "entropy_reduction", "divergence", "arca", "arca_branch"}


def test_outputs_are_float32_detached_and_masked():
    logps = torch.log(torch.tensor([[0.5, 0.25, 1.0, 0.0]])).to(torch.bfloat16).requires_grad_(True)
    w, s = compute_credit_weights("surprisal", completion_mask=MASK.bool(), per_token_logps=logps)
    assert w.dtype == s.dtype == torch.float32
    assert not w.requires_grad and not s.requires_grad
    assert float(s[0, 3]) == 0.0 and float(w[0, 3]) == 0.0  # log 0 = −inf on padding does not leak
    assert close(w.sum(-1), [1.0])


def test_normalize_in_log_space_large_powers():
    """alpha = 20, p = 30: 20^30 overflows float32 (NaN weights before); in log space the weights are finite and
    equal the hand value w_t = a_t^p / sum a^p computed as exp(p log a_t - logsumexp)."""
    scores = torch.tensor([[20.0, 10.0, 19.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = normalize_scores(scores, mask, sharpening=30.0)
    logs = 30.0 * torch.log(torch.tensor([20.0, 10.0, 19.0], dtype=torch.float64) + 1e-8)
    hand = torch.exp(logs - torch.logsumexp(logs, 0))  # (0.8232..., 1.8e-9, 0.1768...)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0, :3].double(), hand, atol=1e-7, rtol=1e-6)
    assert float(w[0, 3]) == 0.0


def test_fallback_rows_break_scale_invariance_as_documented():
    """The eps guard: scores x1e-6 fall back to uniform, x1e-5 do not (max/min weight ratio ~ 100)."""
    from arca_lab.credit import fallback_rows

    base = torch.tensor([[1.0, 10.0, 3.0, 2.0]])
    mask = torch.ones_like(base)
    small, larger = base * 1e-6, base * 1e-5
    # hand check of the guard: sum (a + 1e-8)^2 = 1.14e-10 <= 1e-8 for x1e-6; 1.14e-8 > 1e-8 for x1e-5
    assert bool(fallback_rows(small, mask, sharpening=2.0)) and not bool(
        fallback_rows(larger, mask, sharpening=2.0)
    )
    w_small = normalize_scores(small, mask, sharpening=2.0)
    w_larger = normalize_scores(larger, mask, sharpening=2.0)
    assert torch.equal(w_small, torch.full_like(w_small, 0.25))
    assert float(w_larger.max() / w_larger.min()) == pytest.approx(99.8, rel=1e-2)
