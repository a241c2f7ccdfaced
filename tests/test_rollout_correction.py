"""Train–inference mismatch (arca_lab.rollout.correction): hand examples per correction and metric, identity
(equal log-probs give plain GRPO exactly), padding and NaN handling, argument validation, DC-GRPO's λ."""

import math

import pytest
import torch

from arca_lab.rollout.correction import (
    CORRECTIONS,
    IS_SEQ_AGGS,
    METRIC_NAMES,
    RS_ESTIMATORS,
    RS_LEVELS,
    SAFETY_BOUND,
    check_correction_args,
    check_dc_args,
    correction_weights,
    dc_advantages,
    dc_update,
    is_identity,
    mismatch_metrics,
    per_token_delta,
    rejection_bounds,
)

NAN = math.nan
LN2 = math.log(2.0)


def logps(p_train, p_roll):
    """float32 log-prob tensors from probability rows; None marks padding (NaN in both, as engines may send)."""
    to_log = lambda rows: torch.tensor(  # noqa: E731
        [[NAN if p is None else math.log(p) for p in row] for row in rows], dtype=torch.float32
    )
    mask = torch.tensor([[p is not None for p in row] for row in p_train])
    return to_log(p_train), to_log(p_roll), mask


def from_ratios(ratios, p_roll=0.2):
    """Rows of token ratios ρ = π_train/π_rollout (None: padding) at rollout probability p_roll."""
    p_train = [[None if r is None else r * p_roll for r in row] for row in ratios]
    p_rollout = [[None if r is None else p_roll for r in row] for row in ratios]
    return logps(p_train, p_rollout)


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol
    )


def all_options():
    """Every (kind, kwargs) combination `correction_weights` distinguishes."""
    out = []
    for kind in CORRECTIONS:
        if kind.startswith("sequence_"):
            out += [(kind, {"is_seq_agg": agg}) for agg in IS_SEQ_AGGS]
        elif kind == "rejection":
            out += [(kind, {"rs_estimator": e, "rs_level": lv}) for e in RS_ESTIMATORS for lv in RS_LEVELS]
        else:
            out.append((kind, {}))
    return out


# ---------------------------------------------------------------- per-token δ


def test_per_token_delta_hand():
    a, b, mask = logps([[0.5, 0.2, 0.9, None]], [[0.4, 0.25, 0.9, None]])
    # δ = |0.5 − 0.4|, |0.2 − 0.25|, |0.9 − 0.9|, padding 0
    delta = per_token_delta(a, b, mask)
    assert delta.dtype == torch.float32
    assert close(delta, [[0.1, 0.05, 0.0, 0.0]])
    assert float(delta[0, 2]) == 0.0  # equal log-probs: exactly 0


def test_per_token_delta_tiny_gap_keeps_precision():
    # Δ = 1e-4 at p = 0.5: δ = e^a (1 − e^−Δ) ≈ 5e-5; float32 e^a − e^b would lose ~1e-3 of it.
    a = torch.full((1, 3), math.log(0.5), dtype=torch.float32)
    b = a - 1e-4
    delta_exact = [
        math.exp(float(x)) * -math.expm1(-(float(x) - float(y))) for x, y in zip(a[0], b[0], strict=True)
    ]
    got = per_token_delta(a, b, torch.ones(1, 3))
    assert torch.allclose(got.double(), torch.tensor([delta_exact], dtype=torch.float64), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- metrics


def test_metrics_hand_two_rows():
    # Row 0: p_train (0.5, 0.2), p_roll (0.4, 0.25): ρ = (1.25, 0.8), δ = (0.1, 0.05), Σ_t Δ = ln 1 = 0.
    # Row 1: p_train 0.3, p_roll 0.6: ρ = 0.5, δ = 0.3, Δ = −ln 2. Padding NaN in both.
    a, b, mask = logps([[0.5, 0.2], [0.3, None]], [[0.4, 0.25], [0.6, None]])
    m = mismatch_metrics(a, b, mask)
    assert list(m) == list(METRIC_NAMES)
    # δ over N = 3 tokens: sorted (0.05, 0.1, 0.3); q at position q·(N − 1), linear interpolation
    assert m["mismatch_delta_mean"] == pytest.approx(0.45 / 3, abs=1e-7)
    assert m["mismatch_delta_max"] == pytest.approx(0.3, abs=1e-7)
    assert m["mismatch_delta_q50"] == pytest.approx(0.1, abs=1e-7)  # position 1
    assert m["mismatch_delta_q99"] == pytest.approx(0.1 + 0.98 * (0.3 - 0.1), abs=1e-7)  # position 1.98
    # Δ = (ln 1.25, ln 0.8, −ln 2); ln 1.25 + ln 0.8 = 0
    assert m["mismatch_logratio_mean"] == pytest.approx(-LN2 / 3, abs=1e-7)
    assert m["mismatch_k1"] == pytest.approx(LN2 / 3, abs=1e-7)
    # k3 = ρ − 1 − Δ: (0.25 − ln 1.25) + (−0.2 − ln 0.8) + (−0.5 + ln 2) = 0.05 + ln 2 − 0.5
    assert m["mismatch_k3"] == pytest.approx((0.05 + LN2 - 0.5) / 3, abs=1e-7)
    # χ²_token = mean ρ² − 1 = (1.5625 + 0.64 + 0.25) / 3 − 1
    assert m["mismatch_chi2_token"] == pytest.approx(2.4525 / 3 - 1, abs=1e-6)
    # χ²_seq = mean over 2 rows of (Π ρ)² − 1 = ((1.25·0.8)² + 0.5²) / 2 − 1 = −0.375
    assert m["mismatch_chi2_seq"] == pytest.approx(-0.375, abs=1e-6)
    # ppl ratio = mean_i exp(−mean_t Δ) = (exp(0) + exp(ln 2)) / 2 = 1.5 (a pooled-token ratio would be 2^(1/3))
    assert m["mismatch_ppl_ratio"] == pytest.approx(1.5, abs=1e-6)
    # ESS = (Σρ)² / (N Σρ²) = 2.55² / (3 · 2.4525)
    assert m["mismatch_ess"] == pytest.approx(2.55**2 / (3 * 2.4525), abs=1e-6)
    assert m["mismatch_ratio_raw_min"] == pytest.approx(0.5, abs=1e-6)
    assert m["mismatch_ratio_raw_mean"] == pytest.approx(2.55 / 3, abs=1e-6)
    assert m["mismatch_ratio_raw_max"] == pytest.approx(1.25, abs=1e-6)
    assert m["mismatch_masked_fraction"] == 0.0 and m["mismatch_clipped_fraction"] == 0.0


def test_metrics_safety_clamp_as_verl():
    # One token with Δ = 25 (train log-prob 0, rollout −25): χ² terms use exp(2·clamp(Δ, ±20)) = e^40,
    # the raw ratio is not clamped (e^25).
    a = torch.tensor([[0.0]])
    b = torch.tensor([[-25.0]])
    m = mismatch_metrics(a, b, torch.ones(1, 1))
    assert m["mismatch_chi2_token"] == pytest.approx(math.exp(2 * SAFETY_BOUND) - 1, rel=1e-12)
    assert m["mismatch_chi2_seq"] == pytest.approx(math.exp(2 * SAFETY_BOUND) - 1, rel=1e-12)
    assert m["mismatch_ratio_raw_max"] == pytest.approx(math.exp(25.0), rel=1e-12)
    assert m["mismatch_ess"] == 1.0  # a single token: (ρ)² / (1 · ρ²)


def test_k3_accurate_for_tiny_mismatch():
    # k3 = ρ − 1 − Δ ≈ Δ²/2 + Δ³/6 ≈ 5e-9 at Δ = 1e-4; float32 ρ − 1 carries an error of ~1e-8.
    a = torch.full((2, 4), math.log(0.5), dtype=torch.float32)
    b = a - 1e-4
    d = float(a[0, 0]) - float(b[0, 0])  # the Δ the float32 inputs actually hold
    m = mismatch_metrics(a, b, torch.ones(2, 4))
    assert m["mismatch_k3"] == pytest.approx(math.expm1(d) - d, rel=1e-9)
    assert m["mismatch_k3"] == pytest.approx(d * d / 2 + d**3 / 6, rel=1e-6)


def _direct_metrics(a, b, mask, masked=None, clipped=None):
    """Every metric by plain Python loops over the valid tokens (the docstring's definitions, nothing shared)."""
    B, T = mask.shape
    toks, rows = [], []
    for i in range(B):
        row = [(float(a[i, t]), float(b[i, t])) for t in range(T) if mask[i, t]]
        toks += row
        if row:
            rows.append(row)
    n = len(toks)
    delta = sorted(abs(math.exp(x) - math.exp(y)) for x, y in toks)
    d = [x - y for x, y in toks]
    rho = [math.exp(v) for v in d]

    def quantile(q):
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return delta[lo] + (pos - lo) * (delta[hi] - delta[lo])

    def frac(flags):
        if flags is None:
            return 0.0
        return sum(bool(flags[i, t]) for i in range(B) for t in range(T) if mask[i, t]) / n

    seq_logs = [sum(x - y for x, y in row) for row in rows]
    return {
        "mismatch_delta_mean": sum(delta) / n,
        "mismatch_delta_max": max(delta),
        "mismatch_delta_q50": quantile(0.5),
        "mismatch_delta_q99": quantile(0.99),
        "mismatch_logratio_mean": sum(d) / n,
        "mismatch_k1": sum(-v for v in d) / n,
        "mismatch_k3": sum(r - 1 - v for r, v in zip(rho, d, strict=True)) / n,
        "mismatch_chi2_token": sum(r * r for r in rho) / n - 1,
        "mismatch_chi2_seq": sum(math.exp(2 * s) for s in seq_logs) / len(rows) - 1,
        "mismatch_ppl_ratio": sum(math.exp(-s / len(row)) for s, row in zip(seq_logs, rows, strict=True))
        / len(rows),
        "mismatch_ess": sum(rho) ** 2 / (n * sum(r * r for r in rho)),
        "mismatch_ratio_raw_min": min(rho),
        "mismatch_ratio_raw_mean": sum(rho) / n,
        "mismatch_ratio_raw_max": max(rho),
        "mismatch_masked_fraction": frac(masked),
        "mismatch_clipped_fraction": frac(clipped),
    }


@pytest.mark.parametrize("kind", ["none", "token_truncate", "sequence_mask", "rejection"])
def test_metrics_equal_direct_computation(kind):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    a = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05)
    b = a + 0.4 * torch.randn(B, T, generator=g)  # |Δ| ≲ 1.5: no safety clamp involved
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0] = False  # an empty row: not a sequence of the sequence statistics
    mask[1, 0] = True
    a[~mask] = NAN
    b[~mask] = NAN
    res = correction_weights(kind, a, b, mask, is_clip=1.5, is_band=(0.7, 1.3))
    got = mismatch_metrics(a, b, mask, correction=res)
    want = _direct_metrics(a, b, mask, res.masked, res.clipped)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name
    if kind == "token_truncate":
        assert 0 < got["mismatch_clipped_fraction"] < 1  # the example exercises the fraction


def test_metrics_fractions_hand():
    # ρ = (0.5, 1, 1.5, 3) + one padding token. Truncation at C = 2 clips 1 of 4 valid tokens;
    # the band [0.75, 2] masks 0.5 and 3: 2 of 4.
    a, b, mask = from_ratios([[0.5, 1.0, 1.5, 3.0, None]])
    trunc = correction_weights("token_truncate", a, b, mask, is_clip=2.0)
    masked = correction_weights("token_mask", a, b, mask, is_band=(0.75, 2.0))
    assert mismatch_metrics(a, b, mask, correction=trunc)["mismatch_clipped_fraction"] == 0.25
    assert mismatch_metrics(a, b, mask, correction=trunc)["mismatch_masked_fraction"] == 0.0
    assert mismatch_metrics(a, b, mask, correction=masked)["mismatch_masked_fraction"] == 0.5
    assert mismatch_metrics(a, b, mask, correction=masked)["mismatch_clipped_fraction"] == 0.0


def test_metrics_without_valid_tokens_are_nan():
    a = torch.zeros(2, 3)
    m = mismatch_metrics(a, a, torch.zeros(2, 3))
    assert set(m) == set(METRIC_NAMES) and all(math.isnan(v) for v in m.values())


# ---------------------------------------------------------------- corrections, hand examples


def test_token_truncate_hand():
    a, b, mask = from_ratios([[0.5, 1.0, 1.5, 3.0, None]])
    r = correction_weights("token_truncate", a, b, mask, is_clip=2.0)
    # w = min(ρ, 2): (0.5, 1, 1.5, 2), padding 0
    assert close(r.weights, [[0.5, 1.0, 1.5, 2.0, 0.0]])
    assert r.clipped.tolist() == [[False, False, False, True, False]]
    assert not r.masked.any()


def test_token_mask_hand():
    a, b, mask = from_ratios([[0.25, 0.8, 1.5, 3.0, None]])
    r = correction_weights("token_mask", a, b, mask, is_band=(0.5, 2.0))
    # ρ inside [0.5, 2] kept as ρ, else 0
    assert close(r.weights, [[0.0, 0.8, 1.5, 0.0, 0.0]])
    assert r.masked.tolist() == [[True, False, False, True, False]]
    assert not r.clipped.any()


def test_sequence_sum_vs_mean_long_sequence():
    # Row 0: 30 tokens of ratio 1.1; row 1: 3 tokens of ratio 1.1 and 27 padding tokens.
    T = 30
    a, b, mask = from_ratios([[1.1] * T, [1.1] * 3 + [None] * (T - 3)], p_roll=0.5)
    ones = mask.float()

    def w(kind, agg, **kw):
        return correction_weights(kind, a, b, mask, is_seq_agg=agg, **kw)

    # No effective cap (C = 100): "sum" gives Π ρ = 1.1^30 ≈ 17.449 and 1.1^3 = 1.331; "mean" gives 1.1 for both.
    got = w("sequence_truncate", "sum", is_clip=100.0).weights
    assert torch.allclose(got, torch.tensor([[1.1**30], [1.1**3]]) * ones, rtol=1e-5)
    got = w("sequence_truncate", "mean", is_clip=100.0).weights
    assert torch.allclose(got, 1.1 * ones, rtol=1e-5)  # mean over the 3 valid tokens, not over T = 30
    # C = 2: the long row is truncated to 2 on all its tokens, the short one is not.
    r = w("sequence_truncate", "sum", is_clip=2.0)
    assert torch.allclose(r.weights, torch.tensor([[2.0], [1.1**3]]) * ones, rtol=1e-5)
    assert r.clipped.tolist() == [[True] * T, [False] * T]
    assert not w("sequence_truncate", "mean", is_clip=2.0).clipped.any()
    # Band [0.5, 2]: "sum" masks the long row (17.4 > 2), "mean" keeps both at 1.1.
    r = w("sequence_mask", "sum")
    assert torch.allclose(r.weights, torch.tensor([[0.0], [1.1**3]]) * ones, rtol=1e-5)
    assert r.masked.tolist() == [[True] * T, [False] * T]
    r = w("sequence_mask", "mean")
    assert torch.allclose(r.weights, 1.1 * ones, rtol=1e-5) and not r.masked.any()


def test_rejection_bounds_hand():
    assert rejection_bounds("k1", (0.5, 2.0)) == pytest.approx((-LN2, LN2))  # (−ln hi, −ln lo)
    assert rejection_bounds("k2", (0.5, 2.0)) == (-math.inf, pytest.approx(0.5 * LN2**2))
    # k3(0.5) = −0.5 + ln 2 ≈ 0.193 < k3(2) = 1 − ln 2 ≈ 0.307: the smaller one
    assert rejection_bounds("k3", (0.5, 2.0)) == (-math.inf, pytest.approx(LN2 - 0.5))
    # lo = 0: no lower bound on ρ; k2/k3 then take the upper edge
    assert rejection_bounds("k1", (0.0, 2.0)) == (pytest.approx(-LN2), math.inf)
    assert rejection_bounds("k2", (0.0, 4.0)) == (-math.inf, pytest.approx(0.5 * math.log(4.0) ** 2))


def test_rejection_token_hand():
    ratios = [[0.25, 0.6, 1.7, 1.9, 3.0, None]]
    a, b, mask = from_ratios(ratios)

    def weights(est, band=(0.5, 2.0)):
        r = correction_weights("rejection", a, b, mask, rs_estimator=est, rs_level="token", is_band=band)
        assert torch.equal(r.masked, (r.weights == 0) & mask) and not r.clipped.any()
        return r.weights.tolist()

    # k1: keep 0.5 ≤ ρ ≤ 2 with weight 1 (no reweighting)
    assert weights("k1") == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    # k2 = ½ ln²ρ ≤ ½ ln²2 = 0.240: 0.25 → 0.961, 0.6 → 0.130, 1.7 → 0.141, 1.9 → 0.206, 3 → 0.604
    assert weights("k2") == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    # k3 = ρ − 1 − ln ρ ≤ ln 2 − ½ = 0.193: 0.25 → 0.636, 0.6 → 0.111, 1.7 → 0.169, 1.9 → 0.258, 3 → 0.901
    assert weights("k3") == [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    # Asymmetric band [0.25, 2] on k1 bounds ρ itself: ρ = 0.3 kept, 3 rejected. (verl's "0.25_2.0" on
    # k1 = −ln ρ would bound 1/ρ instead: keep ρ ∈ [0.5, 4], the opposite decisions.)
    a2, b2, mask2 = from_ratios([[0.3, 3.0]])
    r = correction_weights("rejection", a2, b2, mask2, rs_estimator="k1", is_band=(0.25, 2.0))
    assert r.weights.tolist() == [[1.0, 0.0]]


def test_rejection_sequence_hand():
    # Rows (ratios; padding to T = 8):
    #   A (1.5, 2/3): mean k1 = 0, mean k2 = ½ ln²1.5 = 0.082, mean k3 = ½(1.5 + 2/3 − 2) = 0.083 → kept by all
    #   B (3, 1/3):   mean k1 = 0 (cancels!), mean k2 = ½ ln²3 = 0.603, mean k3 = ½(3 + 1/3 − 2) = 0.667
    #   C (2.5, 2.5): mean k1 = −ln 2.5 = −0.916 < −ln 2, mean k2 = ½ ln²2.5 = 0.420, mean k3 = 1.5 − ln 2.5 = 0.584
    #   D 8 × 1.3:    mean k1 = −0.262, mean k2 = 0.034, mean k3 = 0.038 → kept by all
    #                 (the sums −2.10, 0.275, 0.301 would all be rejected: the level is the mean)
    # Bounds for band (0.5, 2): k1 ∈ [−ln 2, ln 2], k2 ≤ 0.240, k3 ≤ 0.193.
    pad = [None] * 6
    p_train = [[0.3, 0.2, *pad], [0.6, 0.1, *pad], [0.5, 0.5, *pad], [0.26] * 8]
    p_roll = [[0.2, 0.3, *pad], [0.2, 0.3, *pad], [0.2, 0.2, *pad], [0.2] * 8]
    a, b, mask = logps(p_train, p_roll)
    keep = {"k1": [1, 1, 0, 1], "k2": [1, 0, 0, 1], "k3": [1, 0, 0, 1]}
    for est, rows in keep.items():
        r = correction_weights("rejection", a, b, mask, rs_estimator=est, rs_level="sequence")
        expected = torch.tensor(rows, dtype=torch.float32)[:, None] * mask.float()
        assert torch.equal(r.weights, expected), est
        assert torch.equal(r.masked, mask & (expected == 0)), est


def test_none_and_dc_grpo_weights_are_the_mask():
    a, b, mask = from_ratios([[0.1, 5.0, None], [2.0, None, None]])
    for kind in ("none", "dc_grpo"):
        r = correction_weights(kind, a, b, mask)
        assert torch.equal(r.weights, mask.float())
        assert not r.masked.any() and not r.clipped.any()


def test_safety_bound_on_weights():
    # Δ = 25: the mask kinds with hi = inf keep the token with weight e^20 (verl's bound), not e^25.
    a = torch.tensor([[0.0, -1.0]])
    b = torch.tensor([[-25.0, -1.0]])
    r = correction_weights("token_mask", a, b, torch.ones(1, 2), is_band=(0.5, math.inf))
    assert r.weights[0, 0].item() == pytest.approx(math.exp(SAFETY_BOUND), rel=1e-6)
    assert r.weights[0, 1].item() == 1.0
    # The decision uses the unclamped ratio: e^25 ≈ 7.2e10 lies above hi = 1e10 > e^20, so it is masked.
    r = correction_weights("token_mask", a, b, torch.ones(1, 2), is_band=(0.5, 1e10))
    assert r.weights.tolist() == [[0.0, 1.0]] and r.masked.tolist() == [[True, False]]


# ---------------------------------------------------------------- identity, padding, NaN, gradients


def test_identity_gives_plain_grpo_exactly():
    g = torch.Generator().manual_seed(1)
    B, T = 5, 9
    a = torch.log(torch.rand(B, T, generator=g) * 0.99 + 0.005)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[2] = False
    b = a.clone()
    b[~mask] = NAN  # padding may differ: ignored
    assert is_identity(a, b, mask)
    for kind, kw in all_options():
        for band in ((0.5, 2.0), (1.0, 1.5), (0.0, math.inf)):
            r = correction_weights(kind, a, b, mask, is_band=band, **kw)
            assert torch.equal(r.weights, mask.float()), (kind, kw, band)
            assert not r.masked.any() and not r.clipped.any(), (kind, kw, band)
    assert torch.equal(per_token_delta(a, b, mask), torch.zeros(B, T))
    m = mismatch_metrics(a, b, mask, correction=correction_weights("token_truncate", a, b, mask))
    ones = {
        "mismatch_ppl_ratio",
        "mismatch_ess",
        *(f"mismatch_ratio_raw_{s}" for s in ("min", "mean", "max")),
    }
    for name, value in m.items():
        assert value == (1.0 if name in ones else 0.0), name  # exactly, not approximately
    # One valid token one ulp apart is no longer the identity; a padding difference still is.
    b2 = b.clone()
    i, t = mask.nonzero()[0].tolist()
    b2[i, t] = torch.nextafter(b2[i, t], torch.tensor(0.0))
    assert not is_identity(a, b2, mask)
    assert per_token_delta(a, b2, mask)[i, t] > 0
    b3 = a.clone()
    b3[~mask] = b3[~mask] + 1.0
    assert is_identity(a, b3, mask)


def test_nan_at_padding_is_ignored():
    g = torch.Generator().manual_seed(2)
    B, T = 4, 6
    a = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05)
    b = a + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[:, 0] = True
    a_nan, b_nan = a.clone(), b.clone()
    a_nan[~mask] = NAN
    b_nan[~mask] = -math.inf
    for kind, kw in all_options():
        clean = correction_weights(kind, a, b, mask, **kw)
        dirty = correction_weights(kind, a_nan, b_nan, mask, **kw)
        assert torch.equal(clean.weights, dirty.weights), (kind, kw)
        assert torch.equal(clean.masked, dirty.masked) and torch.equal(clean.clipped, dirty.clipped)
        assert (dirty.weights[~mask] == 0).all()
    assert torch.equal(per_token_delta(a, b, mask), per_token_delta(a_nan, b_nan, mask))
    assert mismatch_metrics(a, b, mask) == mismatch_metrics(a_nan, b_nan, mask)
    assert not any(math.isnan(v) for v in mismatch_metrics(a_nan, b_nan, mask).values())


def test_nan_at_a_valid_token_is_not_hidden():
    a, b, mask = from_ratios([[1.5, 1.0, 0.9], [1.0, 1.0, None]])
    a[0, 1] = NAN  # the engine or the trainer failed on a valid token of row 0
    m = mismatch_metrics(a, b, mask)
    assert math.isnan(m["mismatch_delta_mean"]) and math.isnan(m["mismatch_k3"])
    assert math.isnan(m["mismatch_chi2_seq"]) and math.isnan(m["mismatch_ess"])
    tok = correction_weights("token_truncate", a, b, mask).weights
    assert math.isnan(tok[0, 1]) and not torch.isnan(tok[0, [0, 2]]).any() and not torch.isnan(tok[1]).any()
    seq = correction_weights("sequence_mask", a, b, mask).weights
    assert torch.isnan(seq[0]).all() and not torch.isnan(seq[1]).any()
    rej = correction_weights("rejection", a, b, mask, rs_estimator="k3")
    assert math.isnan(rej.weights[0, 1]) and not rej.masked[0, 1]


def test_weights_are_detached_float32():
    a, b, mask = from_ratios([[0.5, 3.0], [1.2, None]])
    a = a.nan_to_num(0.0).requires_grad_(True)
    b = b.nan_to_num(0.0).requires_grad_(True)
    for kind, kw in all_options():
        r = correction_weights(kind, a, b, mask, **kw)
        assert r.weights.dtype == torch.float32 and not r.weights.requires_grad, kind
        assert r.masked.dtype == torch.bool and r.clipped.dtype == torch.bool
    assert not per_token_delta(a, b, mask).requires_grad


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"kind": "tis"}, "use one of"),
        ({"is_clip": 0.0}, "is_clip=2.0"),
        ({"is_clip": -1.0}, "is_clip=2.0"),
        ({"is_clip": 0.5}, "is_clip=2.0"),
        ({"is_clip": math.nan}, "is_clip=2.0"),
        ({"is_band": (2.0, 0.5)}, "is_band=(0.5, 2.0)"),
        ({"is_band": (1.0, 1.0)}, "is_band=(0.5, 2.0)"),
        ({"is_band": (-0.1, 2.0)}, "is_band=(0.5, 2.0)"),
        ({"is_band": (1.2, 2.0)}, "is_band=(0.5, 2.0)"),
        ({"is_band": (0.5,)}, "is_band=(0.5, 2.0)"),
        ({"is_band": "0.5,2.0"}, "is_band=(0.5, 2.0)"),
        ({"is_band": (0.5, math.nan)}, "is_band=(0.5, 2.0)"),
        ({"is_seq_agg": "geo"}, "'mean'"),
        ({"rs_estimator": "k4"}, "use one of"),
        ({"rs_level": "seq"}, "use one of"),
    ],
)
def test_bad_correction_arguments_raise(kwargs, fix):
    kwargs = {"kind": "token_truncate", **kwargs}
    with pytest.raises(ValueError) as err:
        check_correction_args(**kwargs)
    assert fix in str(err.value)
    a = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        correction_weights(kwargs.pop("kind"), a, a, torch.ones(1, 2), **kwargs)


def test_bad_shapes_raise():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        correction_weights("token_mask", a, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        mismatch_metrics(a, a, torch.ones(3))
    res = correction_weights("none", a, a, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"correction\.weights"):
        mismatch_metrics(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), correction=res)
    with pytest.raises(ValueError, match="token_advantages"):
        dc_advantages(torch.zeros(3), a, 0.1, torch.ones(2, 3))


# ---------------------------------------------------------------- DC-GRPO


def test_dc_advantages_hand():
    adv = torch.tensor([[1.0, 0.5, -2.0, 9.9]])
    delta = torch.tensor([[0.1, 0.0, 0.2, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # A − λδ with λ = 0.5: 1 − 0.05, 0.5 − 0, −2 − 0.1; padding 0
    assert close(dc_advantages(adv, delta, 0.5, mask), [[0.95, 0.5, -2.1, 0.0]])
    # (B,) advantages broadcast over tokens: A = (2, −1), λ = 0.25
    out = dc_advantages(
        torch.tensor([2.0, -1.0]),
        torch.tensor([[0.1, 0.2], [0.0, 0.4]]),
        0.25,
        torch.tensor([[1, 1], [1, 0]]),
    )
    assert close(out, [[2.0 - 0.025, 2.0 - 0.05], [-1.0, 0.0]])
    assert torch.equal(dc_advantages(adv, delta, 0.0, mask), torch.tensor([[1.0, 0.5, -2.0, 0.0]]))


def test_dc_update_step_by_step():
    # λ₀ = 0.1, lr = 1, c = 0.0037, λ_max = 1 (the Qwen3-8B settings): λ ← clip(λ + (δ̄ − c), 0, 1)
    lam, steps = 0.1, []
    for mean_delta in (0.0050, 0.0020, 0.0037, 0.9, 0.5, 0.0):
        lam = dc_update(lam, mean_delta, target=0.0037, lr=1.0, lam_max=1.0)
        steps.append(lam)
    expected = [
        0.1 + 0.0013,  # 0.1013
        0.1013 - 0.0017,  # 0.0996
        0.0996,  # δ̄ = c: unchanged
        0.0996 + 0.8963,  # 0.9959
        1.0,  # 0.9959 + 0.4963 = 1.4922 → clipped at λ_max
        1.0 - 0.0037,  # 0.9963
    ]
    assert steps == pytest.approx(expected, abs=1e-12)
    # Below the target with a large step: 0.05 + 100 · (0 − 0.0037) = −0.32 → clipped at 0, and stays there.
    assert dc_update(0.05, 0.0, target=0.0037, lr=100.0, lam_max=1.0) == 0.0
    assert dc_update(0.0, 0.001, target=0.0037, lr=1.0, lam_max=1.0) == 0.0
    assert dc_update(0.3, 0.9, target=0.0037, lr=0.0, lam_max=1.0) == 0.3  # lr = 0: fixed λ


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lam": -0.1},
        {"lam": 2.0},
        {"target": -1.0},
        {"target": math.nan},
        {"lr": -1.0},
        {"lam_max": -1.0},
        {"lam_max": math.inf},
    ],
)
def test_bad_dc_arguments_raise(kwargs):
    args = {"lam": 0.1, "target": 0.0037, "lr": 1.0, "lam_max": 1.0, **kwargs}
    with pytest.raises(ValueError):
        check_dc_args(**args)
    with pytest.raises(ValueError):
        dc_update(args.pop("lam"), 0.01, **args)


@pytest.mark.parametrize("mean_delta", [math.nan, math.inf])
def test_dc_update_refuses_nan_mean_delta(mean_delta):
    with pytest.raises(ValueError, match="mean_delta"):
        dc_update(0.1, mean_delta, target=0.0037, lr=1.0, lam_max=1.0)
