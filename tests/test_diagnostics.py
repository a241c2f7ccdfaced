"""Credit diagnostics (arca_lab.diagnostics): Gini, effective tokens / ETR, role mass, batch summary."""

import math

import pytest
import torch

from arca_lab.diagnostics import effective_tokens, etr, gini, role_mass, summarize_credit
from arca_lab.tasks.base import ROLES


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


def test_uniform_and_one_hot():
    n = 5
    mask = torch.tensor([[1] * n + [0] * 2, [1] * n + [0] * 2])
    w = torch.tensor([[1 / n] * n + [0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    # uniform: G = 0, EffN = n, ETR = 1; one-hot: G = (n−1)/n, EffN = 1, ETR = 1/n
    assert close(gini(w, mask), [0.0, (n - 1) / n])
    assert close(effective_tokens(w, mask), [float(n), 1.0], tol=1e-5)
    assert close(etr(w, mask), [1.0, 1 / n])


def test_hand_vector():
    w = torch.tensor([[0.7, 0.1, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # sorted [0.1, 0.2, 0.7], coefficients 2i − n − 1 = [−2, 0, 2]: G = (−0.2 + 1.4) / (3 · 1) = 0.4
    assert close(gini(w, mask), [0.4])
    # EffN = 1 / (0.01 + 0.04 + 0.49) = 1/0.54; ETR = EffN / 3
    assert close(effective_tokens(w, mask), [1 / 0.54], tol=1e-5)
    assert close(etr(w, mask), [1 / (3 * 0.54)], tol=1e-5)
    # Unnormalised weights: G and EffN are scale invariant, EffN = (Σw)²/Σw²
    assert close(gini(3 * w, mask), [0.4]) and close(effective_tokens(3 * w, mask), [1 / 0.54], tol=1e-5)


def test_permutation_invariance_and_padding_position():
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(6, generator=g)
    w = torch.zeros(1, 9)
    w[0, :6] = vals
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, :6] = True
    perm = torch.randperm(9, generator=g)  # scatters the valid tokens among the padding
    wp, mp = w[:, perm], mask[:, perm]
    wp[~mp] = 5.0  # garbage on padding must not matter
    assert close(gini(w, mask), gini(wp, mp)) and close(etr(w, mask), etr(wp, mp))
    # cross-check Gini against the mean-absolute-difference form: G = Σ_ij |w_i − w_j| / (2 n² mean(w))
    n = 6
    mad = (vals[:, None] - vals[None, :]).abs().sum() / (2 * n * n * vals.mean())
    assert close(gini(w, mask), [float(mad)], tol=1e-6)


def test_single_token_rows_are_nan_and_excluded():
    w = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    G = gini(w, mask)
    assert torch.isnan(G[2]) and torch.isnan(G[3])
    s = summarize_credit(w, mask)
    assert s["gini"] == pytest.approx((0.0 + 0.4) / 2, abs=1e-6)  # rows with n > 1 only
    # ETR: [1, 1/(3·0.54), 1 (n = 1)], the empty row excluded; EffN: [4, 1/0.54, 1]
    assert s["etr"] == pytest.approx((1 + 1 / 1.62 + 1) / 3, abs=1e-5)
    assert s["effn"] == pytest.approx((4 + 1 / 0.54 + 1) / 3, abs=1e-5)
    assert s["tokens"] == pytest.approx((4 + 3 + 1 + 0) / 4)
    assert all(isinstance(v, float) for v in s.values())


def test_role_mass_hand_example():
    w = torch.tensor([[0.1, 0.2, 0.7, 0.0], [0.5, 0.25, 0.25, 0.0]])
    roles = torch.tensor([[0, 1, 2, -1], [1, 1, 0, 7]])  # invalid ids on padding are ignored
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    mass = role_mass(w, roles, mask)
    assert close(mass, [[0.1, 0.2, 0.7], [0.25, 0.75, 0.0]])
    assert close(mass.sum(-1), [1.0, 1.0])
    with pytest.raises(ValueError, match="role ids"):
        role_mass(w, torch.tensor([[0, 1, 3, 0], [0, 0, 0, 0]]), mask)

    s = summarize_credit(
        w, mask, roles=roles, raw_scores=torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 6.0, 99.0]])
    )
    assert ROLES == ("format", "work", "answer")
    assert s["role_mass/format"] == pytest.approx((0.1 + 0.25) / 2)
    assert s["role_mass/work"] == pytest.approx((0.2 + 0.75) / 2)
    assert s["role_mass/answer"] == pytest.approx((0.7 + 0.0) / 2)
    # scores over valid tokens [1..6]: mean 3.5, population std √(35/12), max 6 (the 99s are padding)
    assert s["score/mean"] == pytest.approx(3.5)
    assert s["score/std"] == pytest.approx(math.sqrt(35 / 12), rel=1e-6)
    assert s["score/max"] == pytest.approx(6.0)


def test_gini_is_vectorised_over_rows_random_check():
    """Vectorised Gini equals the sorted-sum formula computed row by row in float64."""
    g = torch.Generator().manual_seed(1)
    B, T = 8, 12
    w = torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, :2] = True
    G = gini(w, mask)
    for i in range(B):
        v = sorted(w[i][mask[i]].double().tolist())
        n = len(v)
        ref = sum((2 * (k + 1) - n - 1) * x for k, x in enumerate(v)) / (n * sum(v))
        assert float(G[i]) == pytest.approx(ref, abs=1e-6)


def test_gini_of_uniform_weights_is_exactly_zero():
    """1/T weights (any T) give exactly 0 (logged 5e-9 and -2e-10 before), and Gini is never negative."""
    for T in (3, 7, 24, 37, 113):
        mask = torch.ones(1, T)
        w = torch.full((1, T), 1.0 / T)
        assert float(gini(w, mask)) == 0.0, T
    g = torch.Generator().manual_seed(0)
    near = 1.0 + 1e-7 * torch.rand(64, 50, generator=g)  # nearly uniform rows
    assert (gini(near / near.sum(-1, keepdim=True), torch.ones(64, 50)) >= 0).all()
    summary = summarize_credit(torch.full((4, 9), 1 / 9), torch.ones(4, 9))
    assert summary["gini"] == 0.0
