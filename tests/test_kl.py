"""KL probe (arca_lab.kl): exact softmax KL, its bound, k1/k3 estimators, the probe and its summary."""

import math

import pytest
import torch

from arca_lab.kl import k1_k3, kl_probe, prefix_weights, summarize_kl, token_kl


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


def kl_double_loop(a: list[float], b: list[float]) -> float:
    """KL(softmax a ‖ softmax b) in float64 by hand: p_v = e^{a_v}/Σe^a, Σ_v p_v (log p_v − log q_v)."""
    za = sum(math.exp(x) for x in a)
    zb = sum(math.exp(x) for x in b)
    total = 0.0
    for v in range(len(a)):
        p = math.exp(a[v]) / za
        q = math.exp(b[v]) / zb
        total += p * (math.log(p) - math.log(q))
    return total


def test_token_kl_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, generator=g) * 2
    b = torch.randn(2, 3, 4, generator=g) * 2
    kl = token_kl(a, b)
    assert kl.shape == (2, 3) and kl.dtype == torch.float32
    for i in range(2):
        for t in range(3):
            ref = kl_double_loop(a[i, t].double().tolist(), b[i, t].double().tolist())
            assert float(kl[i, t]) == pytest.approx(ref, abs=1e-6)
    assert close(token_kl(a, b, chunk_size=None), kl) and close(token_kl(a, b, chunk_size=2), kl)


def test_kl_self_is_zero_and_directions_differ():
    a = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(1))
    assert close(token_kl(a, a), torch.zeros(1, 2))
    # p = softmax([0, 0]) = (1/2, 1/2); q = softmax([0, ln 3]) = (1/4, 3/4)
    p_logits = torch.tensor([[[0.0, 0.0]]])
    q_logits = torch.tensor([[[0.0, math.log(3.0)]]])
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3) ≈ 0.1438
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # ≈ 0.1308
    assert float(token_kl(p_logits, q_logits)) == pytest.approx(kl_pq, abs=1e-6)
    assert float(token_kl(q_logits, p_logits)) == pytest.approx(kl_qp, abs=1e-6)
    assert abs(kl_pq - kl_qp) > 0.01


def test_softmax_bound_and_shift_invariance():
    """KL(softmax a ‖ softmax(a+z)) ≤ (max z − min z)²/8 ≤ ‖z‖²/4; constants per position cancel."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 16, 11, generator=g) * 3
    z = torch.randn(4, 16, 11, generator=g) * torch.rand(4, 16, 1, generator=g) * 4  # varied scales
    kl = token_kl(a, a + z)
    rng = z.amax(-1) - z.amin(-1)
    assert (kl >= -1e-6).all()
    assert (kl <= rng.square() / 8 + 1e-5).all()
    assert (rng.square() / 8 <= z.square().sum(-1) / 4 + 1e-5).all()
    c1 = torch.randn(4, 16, 1, generator=g) * 10
    c2 = torch.randn(4, 16, 1, generator=g) * 10
    assert close(token_kl(a + c1, a + z + c2), kl, tol=2e-5)


def test_k3_nonnegative_and_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.1), math.log(0.3)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.3)]])
    k1, k3 = k1_k3(logp, ref)
    # k1 = ln(0.5/0.25), ln(0.1/0.4), 0; k3 = r − ln r − 1 with r = ref/p = 0.5, 4, 1
    assert close(k1, [[math.log(2), math.log(0.25), 0.0]])
    assert close(k3, [[0.5 - math.log(0.5) - 1, 4 - math.log(4) - 1, 0.0]], tol=1e-5)
    g = torch.Generator().manual_seed(3)
    _, k3r = k1_k3(torch.randn(100, generator=g) * 3, torch.randn(100, generator=g) * 3)
    assert (k3r >= 0).all()


def test_k1_k3_are_unbiased_for_exact_kl():
    """E_{y~p}[k1] = E_{y~p}[k3] = KL(p‖q): Monte Carlo, fixed generator, tolerance 4 standard errors."""
    p_logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    q_logits = torch.tensor([0.3, 0.9, -0.1, 1.2, 0.5])
    exact = kl_double_loop(p_logits.tolist(), q_logits.tolist())
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    N = 200_000
    y = torch.multinomial(lp.exp(), N, replacement=True, generator=torch.Generator().manual_seed(4))
    k1, k3 = k1_k3(lp[y][None], lq[y][None])  # (1, N)
    for est in (k1, k3):
        est = est.double()
        se = float(est.std() / math.sqrt(N))
        assert se < 0.01 * exact + 1e-3  # the test has power: the error bar is small against the KL
        assert abs(float(est.mean()) - exact) < 4 * se


def test_kl_probe_components():
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 4, 6
    pol = torch.randn(B, T, V, generator=g)
    ref = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[1, 3] = -100  # padding label out of range must be ignored
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    probe = kl_probe(pol.to(torch.bfloat16), ref.to(torch.bfloat16), ids, mask)
    polb, refb = pol.to(torch.bfloat16).float(), ref.to(torch.bfloat16).float()
    m = mask.bool()
    lp, lr = torch.log_softmax(polb, -1), torch.log_softmax(refb, -1)
    ids0 = ids.clamp_min(0)
    exp_lp = lp.gather(-1, ids0[..., None]).squeeze(-1)
    exp_lr = lr.gather(-1, ids0[..., None]).squeeze(-1)
    expected = {
        "kl_policy_ref": token_kl(polb, refb),
        "kl_ref_policy": token_kl(refb, polb),
        "policy_logps": exp_lp,
        "ref_logps": exp_lr,
        "k1": exp_lp - exp_lr,
        "k3": torch.exp(exp_lr - exp_lp) - (exp_lr - exp_lp) - 1,
        "policy_entropy": -(lp.exp() * lp).sum(-1),
    }
    assert set(probe) == set(expected)
    for k, v in expected.items():
        assert probe[k].dtype == torch.float32, k
        assert close(probe[k], torch.where(m, v, 0.0), tol=1e-5), k
        assert (probe[k][~m] == 0).all(), k
    chunked = kl_probe(pol, ref, ids, mask, chunk_size=3)
    full = kl_probe(pol, ref, ids, mask, chunk_size=None)
    assert all(close(chunked[k], full[k]) for k in full)
    # entropy of uniform logits is log V
    flat = kl_probe(
        torch.zeros(1, 1, V), torch.zeros(1, 1, V), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    )
    assert float(flat["policy_entropy"]) == pytest.approx(math.log(V), abs=1e-6)


def test_summarize_kl_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    x = torch.tensor([[0.1, 0.3, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    lp = torch.zeros_like(x)
    probe = {
        "kl_policy_ref": x,
        "kl_ref_policy": 2 * x,
        "k1": -x,
        "k3": x.square(),
        "policy_logps": lp,
        "ref_logps": lp,
    }
    s = summarize_kl(probe, mask)
    # valid values [0.1, 0.3, 0.5]: mean 0.3, max 0.5; per-sequence sums [0.4, 0.5] (empty row excluded)
    assert s["kl/policy_ref/mean"] == pytest.approx(0.3)
    assert s["kl/policy_ref/max"] == pytest.approx(0.5)
    assert s["kl/policy_ref/seq_mean"] == pytest.approx(0.45)
    # ref_policy is importance-weighted by the prefix ratio rho_<t = exp(sum_{s<t} (ref - pol)); with equal
    # log-probs here rho = 1, so it is the plain per-sequence sum of 2x: (0.8 + 1.0) / 2
    assert s["kl/ref_policy/seq_mean"] == pytest.approx(0.9)
    assert s["kl/k1/max"] == pytest.approx(-0.1)
    assert s["kl/k3/mean"] == pytest.approx((0.01 + 0.09 + 0.25) / 3)
    assert len(s) == 12 and all(isinstance(v, float) for v in s.values())
    with pytest.raises(ValueError, match="k3"):
        summarize_kl({"kl_policy_ref": x}, mask)


def test_shape_errors():
    with pytest.raises(ValueError):
        token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError):
        kl_probe(
            torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2)
        )
    with pytest.raises(ValueError, match="completion_ids"):
        kl_probe(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.tensor([[3]]), torch.ones(1, 1))


def _two_step_toy():
    """Two tokens, vocabulary {0, 1}: every completion y = (y1, y2) with its exact probability under each model.

    pi_theta(y1) = (0.8, 0.2), pi_theta(y2 | y1) = (0.9, 0.1) after 0 and (0.3, 0.7) after 1;
    pi_ref(y1) = (0.3, 0.7),  pi_ref(y2 | y1) = (0.5, 0.5) after 0 and (0.05, 0.95) after 1.
    """
    pol1, ref1 = torch.tensor([0.8, 0.2]), torch.tensor([0.3, 0.7])
    pol2 = torch.tensor([[0.9, 0.1], [0.3, 0.7]])  # row: y1
    ref2 = torch.tensor([[0.5, 0.5], [0.05, 0.95]])
    ids = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])  # (B=4, T=2): all completions
    pol_logits = torch.stack([torch.stack([pol1, pol2[y1]]) for y1 in ids[:, 0]]).log()  # (4, 2, 2)
    ref_logits = torch.stack([torch.stack([ref1, ref2[y1]]) for y1 in ids[:, 0]]).log()
    p_pol = torch.tensor([pol1[a] * pol2[a, b] for a, b in ids.tolist()], dtype=torch.float64)  # (4,)
    p_ref = torch.tensor([ref1[a] * ref2[a, b] for a, b in ids.tolist()], dtype=torch.float64)
    return pol_logits, ref_logits, ids, p_pol, p_ref


def test_sequence_kl_ref_policy_is_importance_weighted():
    """E_{y~pi_theta}[seq estimate] equals the exact sequence KL(pi_ref || pi_theta) on a 2-step toy; the
    unweighted sum of per-token KL(pi_ref || pi_theta) (what was logged before) does not."""
    pol_logits, ref_logits, ids, p_pol, p_ref = _two_step_toy()
    mask = torch.ones_like(ids)
    probe = kl_probe(pol_logits, ref_logits, ids, mask)
    exact_rp = float((p_ref * (p_ref / p_pol).log()).sum())  # sum_y pi_ref(y) log(pi_ref(y) / pi_theta(y))
    exact_pr = float((p_pol * (p_pol / p_ref).log()).sum())
    rho = prefix_weights(probe["policy_logps"], probe["ref_logps"], mask)  # (4, 2)
    # hand computation of rho_<2 for y1 = 0: pi_ref(0) / pi_theta(0) = 0.3 / 0.8
    assert float(rho[0, 1]) == pytest.approx(0.3 / 0.8, rel=1e-6) and float(rho[0, 0]) == 1.0
    per_seq = (rho * probe["kl_ref_policy"].double()).sum(-1)  # (4,)
    assert float((p_pol * per_seq).sum()) == pytest.approx(exact_rp, rel=1e-5)
    unweighted = float((p_pol * probe["kl_ref_policy"].double().sum(-1)).sum())
    assert abs(unweighted - exact_rp) > 0.1  # the old estimate is biased here: 0.57 vs 0.83-like gap
    pr = float((p_pol * probe["kl_policy_ref"].double().sum(-1)).sum())
    assert pr == pytest.approx(exact_pr, rel=1e-5)  # the forward direction needs no weights
    # summarize_kl's seq_mean is the row mean of the same per-sequence estimates
    s = summarize_kl(probe, mask)
    assert s["kl/ref_policy/seq_mean"] == pytest.approx(float(per_seq.mean()), rel=1e-6)
    assert math.isnan(summarize_kl(probe, mask, sequence_estimates=False)["kl/ref_policy/seq_mean"])
