"""Train–inference mismatch: diagnostics, importance corrections and DC-GRPO shaping (pure tensor functions).

The engine that samples a completion and the trainer that scores it in the loss forward assign the sampled
tokens different probabilities ("black-box discrepancy", arXiv 2606.08779). This module measures the gap
(`mismatch_metrics`, `per_token_delta`), turns it into per-token loss weights (`correction_weights`: TIS,
MIS/IcePop, sequence-level variants as in TRL's `vllm_importance_sampling_*`, verl's rejection sampling
`rollout_rs`) and implements DC-GRPO's Lagrangian advantage shaping (`dc_advantages`, `dc_update`).
Nothing here runs a model: the trainer passes the two log-prob tensors and applies the results.
verl references are to its rollout correction (verl/trainer/ppo/rollout_corr_helper.py, docs/algo/
rollout_corr.md and rollout_corr_math.md; read at commit 4849643 of the zpqiu/verl mirror); TRL's to
GRPOTrainer in trl 1.16.0 (trl/trainer/grpo_trainer.py, `vllm_importance_sampling_*`).

How the trainer uses the outputs (its choice, not this module's):
    per_token_loss = per_token_loss * result.weights                      # TRL: `*= importance_sampling_ratio`
    completion_mask = completion_mask & ~result.masked                     # optional, verl's rejection
TRL's mask modes only zero the weight, so a masked token still counts in the loss's denominator; verl applies
rejection through `response_mask`, which also removes it from the denominator. `masked` allows either.

Notation:
    B: completions; T: padded completion length; "valid": completion_mask is 1/True
    N: valid tokens of the batch; S: sequences with at least one valid token; T_i: valid tokens of row i
    per_token_logps: (B, T) log π_train(y_t | ·) of the sampled tokens at the sampling temperature (trainer)
    rollout_logps: (B, T) log π_rollout(y_t | ·) of the same tokens, from the engine that sampled them
    completion_mask: (B, T) int or bool
    Δ_t = per_token_logps − rollout_logps: the log-ratio, train over rollout (TRL: old − sampling; verl:
        `log_ratio`)
    ρ_t = exp(Δ_t) = π_train(y_t) / π_rollout(y_t): the token importance ratio (r in Schulman's estimators)
    δ_t = |π_train(y_t) − π_rollout(y_t)|: the token discrepancy in probability space (arXiv 2606.08779)
    C: `is_clip`; [lo, hi]: `is_band`; λ: DC-GRPO's multiplier; c: its target (tolerance) on mean δ
    token_advantages: (B, T) per-token advantages of the loss (A · T_i · w_t with token credit w)

Conventions:
    * Padding is read only through `torch.where(mask, ·, 0)`, so NaN or ±inf there never leaks (NaN · 0 is NaN,
      hence no multiplication by the mask).
    * A NaN log-prob at a *valid* token is not hidden: it makes the metrics NaN and the weight of that token
      (token kinds) or of its whole sequence (sequence kinds) NaN. TRL instead treats it as Δ = 0; that
      decision belongs to the caller, who knows why the engine returned NaN.
    * Internal arithmetic is float64: k3 = ρ − 1 − Δ and δ are differences of nearly equal numbers, and
      float32 loses them for |Δ| ≲ 1e-4 (float32 eps · 1 ≈ 1e-7 against k3 ≈ Δ²/2 ≈ 5e-9).
    * Weights are detached float32, 0 at padding (importance weights change the measure, not the objective:
      verl docs/algo/rollout_corr_math.md §3.2.2).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CORRECTIONS: tuple[str, ...] = (
    "none",
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask",
    "rejection",
    "dc_grpo",
)
"""Kinds `correction_weights` accepts."""

IS_SEQ_AGGS: tuple[str, ...] = ("sum", "mean")
"""Sequence log-ratio: Σ_t Δ_t (TRL's, the full product of ratios) or mean_t Δ_t (the geometric mean)."""

RS_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
"""Per-token statistics of rejection sampling (verl `rollout_rs` token_k*/seq_mean_k*)."""

RS_LEVELS: tuple[str, ...] = ("token", "sequence")
"""Rejection per token, or per sequence on the mean of the token statistic over the sequence."""

METRIC_NAMES: tuple[str, ...] = (
    "mismatch_delta_mean",
    "mismatch_delta_max",
    "mismatch_delta_q50",
    "mismatch_delta_q99",
    "mismatch_logratio_mean",
    "mismatch_k1",
    "mismatch_k3",
    "mismatch_chi2_token",
    "mismatch_chi2_seq",
    "mismatch_ppl_ratio",
    "mismatch_ess",
    "mismatch_ratio_raw_min",
    "mismatch_ratio_raw_mean",
    "mismatch_ratio_raw_max",
    "mismatch_masked_fraction",
    "mismatch_clipped_fraction",
)
"""Keys of `mismatch_metrics`, in order."""

SAFETY_BOUND = 20.0
"""|log-ratio| cap before exponentiating weights and χ² terms (verl rollout_corr_helper.py `SAFETY_BOUND`)."""


@dataclass(frozen=True)
class CorrectionResult:
    """Output of `correction_weights`; every tensor is (B, T) and False/0 at padding."""

    weights: torch.Tensor
    """(B, T) float32, detached: the factor for each token's loss term."""
    masked: torch.Tensor
    """(B, T) bool: valid tokens whose weight the correction set to 0 (mask and rejection kinds)."""
    clipped: torch.Tensor
    """(B, T) bool: valid tokens whose weight was truncated, i.e. ρ (or ρ_seq) > C (truncate kinds)."""


# ---------------------------------------------------------------- validation


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def check_correction_args(
    kind: str,
    *,
    is_clip: float = 2.0,
    is_band: Sequence[float] = (0.5, 2.0),
    is_seq_agg: str = "sum",
    rs_estimator: str = "k1",
    rs_level: str = "token",
) -> None:
    """Raise ValueError, naming the fix, if `correction_weights` would reject these arguments.

    All arguments are checked whatever `kind` is, so a typo in an unused option fails at configuration time.
    C ≥ 1 and lo ≤ 1 ≤ hi are required (stricter than TRL and verl, which only ask C > 0): with them every
    correction leaves a token on which the two engines agree (ρ = 1) at weight exactly 1, so with identical
    log-probs every kind is plain GRPO. C = inf and hi = inf (no cap), lo = 0 (no lower bound) are allowed.
    """
    if kind not in CORRECTIONS:
        raise ValueError(f"unknown correction {kind!r}; use one of {CORRECTIONS}")
    if not _is_real(is_clip) or is_clip < 1.0:
        raise ValueError(
            f"is_clip must be a number >= 1 (a cap below 1 would down-weight tokens on which the engines agree), "
            f"got {is_clip!r}; TIS uses e.g. is_clip=2.0"
        )
    if isinstance(is_band, str) or len(is_band) != 2:
        raise ValueError(
            f"is_band must be a pair (lo, hi) of numbers, got {is_band!r}; e.g. is_band=(0.5, 2.0)"
        )
    lo, hi = is_band
    if not (_is_real(lo) and _is_real(hi)):
        raise ValueError(f"is_band must hold two numbers (not NaN), got {is_band!r}; e.g. is_band=(0.5, 2.0)")
    if lo < 0 or lo >= hi or not (lo <= 1.0 <= hi):
        raise ValueError(
            f"is_band (lo, hi) must satisfy 0 <= lo <= 1 <= hi and lo < hi (the band is on ratios "
            f"pi_train/pi_rollout and must keep ratio 1), got {is_band!r}; e.g. is_band=(0.5, 2.0)"
        )
    if is_seq_agg not in IS_SEQ_AGGS:
        raise ValueError(f"unknown is_seq_agg {is_seq_agg!r}; use 'sum' (TRL) or 'mean' (geometric mean)")
    if rs_estimator not in RS_ESTIMATORS:
        raise ValueError(f"unknown rs_estimator {rs_estimator!r}; use one of {RS_ESTIMATORS}")
    if rs_level not in RS_LEVELS:
        raise ValueError(f"unknown rs_level {rs_level!r}; use one of {RS_LEVELS}")


def check_dc_args(*, lam: float, target: float, lr: float, lam_max: float) -> None:
    """Raise ValueError, naming the fix, on DC-GRPO hyperparameters `dc_update` cannot use."""
    if not _is_real(lam_max) or not math.isfinite(lam_max) or lam_max < 0:
        raise ValueError(f"lam_max must be a finite number >= 0, got {lam_max!r}; e.g. lam_max=1.0")
    if not _is_real(lam) or not 0.0 <= lam <= lam_max:
        raise ValueError(f"lambda must lie in [0, lam_max={lam_max}], got {lam!r}; e.g. lambda0=0.1")
    if not _is_real(target) or not math.isfinite(target) or target < 0:
        raise ValueError(
            f"target c must be a finite number >= 0 (a tolerance on mean delta), got {target!r}; "
            "resolve an 'automatic' target before calling"
        )
    if not _is_real(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0 (0 keeps lambda fixed), got {lr!r}; e.g. lr=1.0")


def _check_inputs(
    per_token_logps: torch.Tensor, rollout_logps: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool mask after shape checks."""
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be (B, T), got shape {tuple(completion_mask.shape)}")
    for name, x in (("per_token_logps", per_token_logps), ("rollout_logps", rollout_logps)):
        if x.shape != completion_mask.shape:
            raise ValueError(
                f"{name} must have the shape of completion_mask {tuple(completion_mask.shape)}, "
                f"got {tuple(x.shape)}"
            )
    return completion_mask.bool()


def _log_ratio(
    per_token_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Δ = per_token_logps − rollout_logps, (B, T) float64, detached, exactly 0 at padding."""
    diff = per_token_logps.detach().double() - rollout_logps.detach().double()  # (B, T)
    return torch.where(mask, diff, 0.0)


# ---------------------------------------------------------------- diagnostics


def is_identity(
    per_token_logps: torch.Tensor, rollout_logps: torch.Tensor, completion_mask: torch.Tensor
) -> bool:
    """True iff the two log-prob tensors are equal on every valid token (padding ignored; NaN is never equal).

    Then Δ = 0 and δ = 0 exactly on valid tokens, every `correction_weights` kind returns the mask itself
    (weights 1, nothing masked or clipped) and `mismatch_metrics` returns its identity values (see there):
    the run is plain GRPO whatever the correction.
    """
    mask = _check_inputs(per_token_logps, rollout_logps, completion_mask)
    same = per_token_logps.detach().double() == rollout_logps.detach().double()  # (B, T)
    return bool(same[mask].all())


def _prob_gap(per_token_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """δ = |e^a − e^b| as e^max(a,b) · (1 − e^−|a−b|) (our rewriting: no cancellation of two close
    probabilities; exactly 0 when a = b), (B, T) float64, 0 at padding."""
    a = per_token_logps.detach().double()  # (B, T)
    b = rollout_logps.detach().double()  # (B, T)
    gap = torch.exp(torch.maximum(a, b)) * -torch.expm1(-(a - b).abs())  # (B, T)
    return torch.where(mask, gap, 0.0)


def per_token_delta(
    per_token_logps: torch.Tensor, rollout_logps: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """δ_t = |π_train(y_t) − π_rollout(y_t)| per token (arXiv 2606.08779's token discrepancy), (B, T) float32,
    0 at padding: the final-step array for run.nc and the input of `dc_advantages`."""
    mask = _check_inputs(per_token_logps, rollout_logps, completion_mask)
    return _prob_gap(per_token_logps, rollout_logps, mask).float()


def mismatch_metrics(
    per_token_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    correction: CorrectionResult | None = None,
) -> dict[str, float]:
    """Train–inference mismatch of one batch, all over its N valid tokens (keys: `METRIC_NAMES`).

    Token statistics average over the N valid tokens of the batch (not per sequence first); sequence
    statistics average over the S sequences with at least one valid token (verl divides by the batch size
    and counts an empty row as ratio 1).

    * ``mismatch_delta_{mean,max,q50,q99}``: mean, max and the 0.5 / 0.99 quantiles (linear interpolation,
      `torch.quantile`'s default) of δ_t = |π_train(y_t) − π_rollout(y_t)| in probability space
      (arXiv 2606.08779's δ; DC-GRPO's constraint is on its mean).
    * ``mismatch_logratio_mean`` = mean_t Δ_t = mean_t (log π_train − log π_rollout): the sign of Δ (TRL's
      `old − sampling`); < 0 means the trainer finds the sampled tokens less likely than the engine did.
    * ``mismatch_k1`` = mean_t (−Δ_t) = −``mismatch_logratio_mean``: Schulman's k1 = −log r, r = ρ_t, an
      unbiased estimator of KL(π_rollout ‖ π_train) on tokens sampled from the rollout (verl's `kl`; may be
      negative on a finite batch).
    * ``mismatch_k3`` = mean_t (ρ_t − 1 − Δ_t): Schulman's k3 = r − 1 − log r, also unbiased for
      KL(π_rollout ‖ π_train) and ≥ 0 per token (verl's `k3_kl`).
    * ``mismatch_chi2_token`` = mean_t ρ_t² − 1 and ``mismatch_chi2_seq`` = mean_i (Π_t ρ_t)² − 1, the χ²
      divergences of verl's `compute_offpolicy_metrics` (rollout_corr_math.md §4.3); the product is computed
      as exp(2 · clamp(Σ_t Δ_t, ±20)) and the token term as exp(2 · clamp(Δ_t, ±20)), verl's safety clamp.
    * ``mismatch_ppl_ratio`` = mean_i exp(mean_{t∈i} (log π_rollout − log π_train)) = mean_i PPL_train,i /
      PPL_rollout,i: per-sequence perplexity ratios, averaged (verl's `ppl_ratio` as its code computes it;
      its docs write exp of the mean log). > 1: the trainer is less confident than the engine.
    * ``mismatch_ess`` = (Σ_t ρ_t)² / (N Σ_t ρ_t²) ∈ (0, 1], ρ_t safety-clamped: the normalised effective
      sample size of the token ratios. verl's `rollout_is_eff_sample_size` has the same formula but applies
      it to the truncated weights clipped to [1/C, C]; here it is taken on ρ itself so that it measures the
      mismatch and does not depend on the correction chosen.
    * ``mismatch_ratio_raw_{min,mean,max}``: min, mean, max of ρ_t = exp(Δ_t) with no clamp or truncation
      (TRL issue 5231 asks for pre-clip ratios; TRL logs them after clipping). Token level whatever the
      correction; E_rollout[ρ] = 1 when the engine samples from π_rollout's full support (TRL issue 6789:
      top-p/top-k break that).
    * ``mismatch_masked_fraction`` / ``mismatch_clipped_fraction``: fractions of valid tokens that
      `correction` set to 0 / truncated; 0.0 when `correction` is None (no correction applied).

    Identity values (per_token_logps equal to rollout_logps on valid tokens, see `is_identity`): δ, logratio,
    k1, k3, χ² and the fractions exactly 0; ppl_ratio, ess and the raw ratios exactly 1. With no valid token
    at all every value is NaN. A NaN log-prob at a valid token makes the statistics NaN (fractions excepted).
    """
    mask = _check_inputs(per_token_logps, rollout_logps, completion_mask)
    if correction is not None:
        for name in ("weights", "masked", "clipped"):
            shape = tuple(getattr(correction, name).shape)
            if shape != tuple(mask.shape):
                raise ValueError(f"correction.{name} has shape {shape}, expected {tuple(mask.shape)}")
    n_valid = int(mask.sum())
    if n_valid == 0:
        return dict.fromkeys(METRIC_NAMES, math.nan)

    log_ratio = _log_ratio(per_token_logps, rollout_logps, mask)  # (B, T), 0 at padding
    d = log_ratio[mask]  # (N,)
    gap = _prob_gap(per_token_logps, rollout_logps, mask)[mask]  # (N,)
    rho_raw = torch.exp(d)  # (N,)
    rho = torch.exp(d.clamp(-SAFETY_BOUND, SAFETY_BOUND))  # (N,)
    k3 = torch.expm1(d) - d  # (N,); expm1 keeps ρ − 1 accurate for small Δ

    rows = mask.any(dim=-1)  # (B,)
    counts = mask.sum(dim=-1)[rows].double()  # (S,)
    seq_sum = log_ratio.sum(dim=-1)[rows]  # (S,) Σ_t Δ_t
    seq_mean = seq_sum / counts  # (S,)
    chi2_seq = torch.exp(2.0 * seq_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0
    ppl_ratio = torch.exp(-seq_mean).mean()

    quantiles = torch.quantile(gap, torch.tensor([0.5, 0.99], dtype=gap.dtype))  # (2,)
    zero = gap.new_zeros(())
    if correction is None:
        masked_frac, clipped_frac = zero, zero
    else:
        masked_frac = correction.masked.bool()[mask].double().mean()
        clipped_frac = correction.clipped.bool()[mask].double().mean()

    values = torch.stack(
        [
            gap.mean(),
            gap.max(),
            quantiles[0],
            quantiles[1],
            d.mean(),
            (-d).mean(),
            k3.mean(),
            rho.square().mean() - 1.0,
            chi2_seq,
            ppl_ratio,
            rho.sum().square() / (n_valid * rho.square().sum()),
            rho_raw.min(),
            rho_raw.mean(),
            rho_raw.max(),
            masked_frac,
            clipped_frac,
        ]
    )  # (len(METRIC_NAMES),): one host transfer instead of sixteen `.item()` calls
    return dict(zip(METRIC_NAMES, values.tolist(), strict=True))


# ---------------------------------------------------------------- corrections


def _k1(r: float) -> float:
    return -math.log(r) if r > 0 else math.inf


def rejection_bounds(rs_estimator: str, is_band: Sequence[float] = (0.5, 2.0)) -> tuple[float, float]:
    """Acceptance interval [a, b] of the rejection statistic (token value, or its mean over a sequence).

    Our mapping of the ratio band [lo, hi] (verl takes the thresholds directly, see `correction_weights`):

    * k1 = −log r (signed, decreasing in r): [a, b] = [−log hi, −log lo], i.e. at token level exactly
      lo ≤ ρ_t ≤ hi, at sequence level lo ≤ (Π_t ρ_t)^(1/T_i) ≤ hi (verl's Geo-RS, `seq_mean_k1`).
    * k2 = ½(log r)² and k3 = r − 1 − log r (≥ 0, one-sided): [a, b] = [−inf, τ] with τ = min(k(lo), k(hi)),
      the largest threshold whose token-level acceptance set {r : k(r) ≤ τ} lies inside [lo, hi], so no
      token outside the band is kept. k2 is symmetric in log r: for a band with lo·hi = 1, such as the
      default (0.5, 2), it accepts exactly the band (τ = ½ ln²2 ≈ 0.2402). k3 is not: for (0.5, 2)
      τ = k3(0.5) = ln 2 − ½ ≈ 0.1931 and the token acceptance set is [0.5, 1.7564].
      To reproduce verl's settings: k2/k3 threshold τ → lo = 0 and hi with ½ ln²hi = τ (k2) or
      hi − 1 − ln hi = τ (k3); k1 "lo_hi" (which bounds 1/r, see `correction_weights`) → is_band = (1/hi, 1/lo).
    """
    if rs_estimator not in RS_ESTIMATORS:
        raise ValueError(f"unknown rs_estimator {rs_estimator!r}; use one of {RS_ESTIMATORS}")
    lo, hi = float(is_band[0]), float(is_band[1])
    if rs_estimator == "k1":
        return _k1(hi), _k1(lo)
    if rs_estimator == "k2":
        return -math.inf, 0.5 * min(_k1(lo) ** 2, _k1(hi) ** 2)

    def k3(r: float) -> float:
        return r - 1.0 - math.log(r) if 0 < r < math.inf else math.inf

    return -math.inf, min(k3(lo), k3(hi))


def correction_weights(
    kind: str,
    per_token_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    is_clip: float = 2.0,
    is_band: Sequence[float] = (0.5, 2.0),
    is_seq_agg: str = "sum",
    rs_estimator: str = "k1",
    rs_level: str = "token",
) -> CorrectionResult:
    """Per-token loss weights correcting for the rollout engine's mismatch (`CORRECTIONS`).

    * ``none``, ``dc_grpo``: weight 1 (DC-GRPO acts on the advantage: `dc_advantages`).
    * ``token_truncate`` (TIS, Yao et al. 2025; TRL `token_truncate`, verl `rollout_is="token"`):
      w_t = min(ρ_t, C); `clipped` where ρ_t > C.
    * ``token_mask`` (MIS / IcePop; TRL `token_mask`): w_t = ρ_t if lo ≤ ρ_t ≤ hi else 0; `masked` where 0.
    * ``sequence_truncate`` / ``sequence_mask`` (TRL `sequence_*`): the same rules on the sequence ratio
      ρ_i = exp(Σ_t Δ_t) (``is_seq_agg="sum"``, TRL's: the full importance ratio of the sequence) or
      ρ_i = exp(mean_t Δ_t) (``"mean"``: the geometric mean of the token ratios, length-independent, as
      asked in TRL issue 5814), broadcast to the sequence's valid tokens. For the long-sequence trap: 100
      tokens of ratio 1.1 give 1.1¹⁰⁰ ≈ 1.4e4 with "sum" but 1.1 with "mean" (verl rollout_corr_math.md
      §3.3.3).
    * ``rejection`` (verl `rollout_rs`, `compute_rollout_rejection_mask` in verl/trainer/ppo/
      rollout_corr_helper.py): w = 1 if the statistic lies in `rejection_bounds(rs_estimator, is_band)`,
      else 0 — a hard filter, no reweighting. Token statistics with log r = Δ_t, r = π_train/π_rollout:
      k1 = −log r, k2 = ½(log r)², k3 = r − 1 − log r (verl's `token_k1/k2/k3`). ``rs_level="token"``
      judges each token (verl `token_k*`); ``"sequence"`` judges the mean of the statistic over the
      sequence's valid tokens and keeps or drops the whole sequence (verl `seq_mean_k*`; verl's
      `seq_sum_*` and `seq_max_*` are not offered). verl's own k1 thresholds "lo_hi" bound −log r, i.e.
      they accept lo ≤ π_rollout/π_train ≤ hi; ours bound r itself (lo ≤ ρ ≤ hi, the band every other kind
      uses). The two agree for the default reciprocal band (lo = 1/hi).

    Truncation and masking decisions compare the unclamped ratio (float64); the weight values use
    exp(clamp(log-ratio, ±20)) (verl's safety bound, reached only by ratios beyond 4.85e8). Arguments are
    validated by `check_correction_args` (ValueError). A NaN log-prob at a valid token gives that token
    (token kinds) or its sequence (sequence kinds) weight NaN and marks it neither masked nor clipped.
    """
    check_correction_args(
        kind,
        is_clip=is_clip,
        is_band=is_band,
        is_seq_agg=is_seq_agg,
        rs_estimator=rs_estimator,
        rs_level=rs_level,
    )
    mask = _check_inputs(per_token_logps, rollout_logps, completion_mask)
    nothing = torch.zeros_like(mask)  # (B, T) bool
    if kind in ("none", "dc_grpo"):
        return CorrectionResult(weights=mask.float(), masked=nothing, clipped=nothing.clone())

    lo, hi = float(is_band[0]), float(is_band[1])
    log_ratio = _log_ratio(per_token_logps, rollout_logps, mask)  # (B, T), 0 at padding
    # (B, 1); the clamp only guards empty rows, which have no token to weight
    counts = mask.sum(dim=-1, keepdim=True).clamp_min(1).double()

    if kind == "rejection":
        if rs_estimator == "k1":
            stat = -log_ratio  # (B, T)
        elif rs_estimator == "k2":
            stat = 0.5 * log_ratio.square()
        else:
            stat = torch.expm1(log_ratio) - log_ratio  # expm1: ρ − 1 stays accurate for small Δ
        if rs_level == "sequence":
            # padding holds Δ = 0, where k1 = k2 = k3 = 0 exactly, so the plain row sum is the valid-token sum
            stat = (stat.sum(dim=-1, keepdim=True) / counts).expand_as(log_ratio)  # (B, T)
        a, b = rejection_bounds(rs_estimator, (lo, hi))
        outside = (stat < a) | (stat > b)  # (B, T); False on NaN
        weights = torch.where(outside, 0.0, torch.where(torch.isnan(stat), math.nan, 1.0))
        masked, clipped = outside, nothing
    else:
        if kind.startswith("sequence_"):
            seq = log_ratio.sum(dim=-1, keepdim=True)  # (B, 1) Σ_t Δ_t = log Π_t ρ_t
            if is_seq_agg == "mean":
                seq = seq / counts  # log of the geometric mean
            stat = seq.expand_as(log_ratio)  # (B, T)
        else:
            stat = log_ratio  # (B, T)
        rho_raw = torch.exp(stat)  # (B, T) unclamped, only for the decisions (float64: inf only beyond 709)
        rho = torch.exp(stat.clamp(-SAFETY_BOUND, SAFETY_BOUND))  # (B, T); NaN stays NaN
        if kind.endswith("_truncate"):
            weights = rho.clamp(max=is_clip)
            masked, clipped = nothing, rho_raw > is_clip
        else:  # *_mask
            outside = (rho_raw < lo) | (rho_raw > hi)  # False on NaN
            weights = torch.where(outside, 0.0, rho)
            masked, clipped = outside, nothing

    return CorrectionResult(
        weights=torch.where(mask, weights, 0.0).float().detach(),
        masked=masked & mask,
        clipped=clipped & mask,
    )


# ---------------------------------------------------------------- DC-GRPO


def dc_advantages(
    token_advantages: torch.Tensor, delta: torch.Tensor, lam: float, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Discrepancy-shaped advantages A'_t = A_t − λ δ_t on valid tokens, 0 at padding, (B, T) float32.

    Source: DC-GRPO (arXiv 2606.08779): the Lagrangian of the discrepancy-constrained MDP shapes the
    advantage as A_t − λ δ_t (the form as read from a secondary summary of the paper, not yet checked against
    its text). A_t is the per-token advantage the loss multiplies, here A · T_i · w_t with token credit w
    (A_t = A for uniform credit); `token_advantages` may be (B, T), or (B,) for one advantage per completion
    (TRL's `advantages`), broadcast over the tokens. `delta` is `per_token_delta`'s δ.
    """
    mask = completion_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"completion_mask must be (B, T), got shape {tuple(completion_mask.shape)}")
    if delta.shape != mask.shape:
        raise ValueError(
            f"delta must have the shape of completion_mask {tuple(mask.shape)}, got {tuple(delta.shape)}"
        )
    if token_advantages.dim() == 1 and token_advantages.shape[0] == mask.shape[0]:
        token_advantages = token_advantages[:, None]  # (B, 1), broadcast over T
    elif token_advantages.shape != mask.shape:
        raise ValueError(
            f"token_advantages must be (B, T) {tuple(mask.shape)} or (B,), got {tuple(token_advantages.shape)}"
        )
    if not _is_real(lam) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    shaped = token_advantages.detach().float() - lam * delta.detach().float()  # (B, T)
    return torch.where(mask, shaped, 0.0)


def dc_update(lam: float, mean_delta: float, *, target: float, lr: float, lam_max: float) -> float:
    """One projected dual-ascent step λ ← clip(λ + lr · (mean δ − c), 0, λ_max) (DC-GRPO, arXiv 2606.08779;
    the update and the lower clip at 0 as read from secondary summaries of the paper, which give λ₀ = 0.1,
    lr = 1.0, c = 0.0037 for Qwen3-8B).

    λ grows while the batch's mean discrepancy (`mismatch_delta_mean`) exceeds the tolerance c and decays
    toward 0 below it. A NaN or infinite `mean_delta` raises ValueError instead of poisoning λ for the rest
    of the run; the hyperparameters are checked by `check_dc_args`.
    """
    check_dc_args(lam=lam, target=target, lr=lr, lam_max=lam_max)
    if not _is_real(mean_delta) or not math.isfinite(mean_delta):
        raise ValueError(
            f"mean_delta must be a finite number, got {mean_delta!r}; a NaN usually means a NaN rollout "
            "log-prob at a valid token"
        )
    return min(max(lam + lr * (mean_delta - target), 0.0), lam_max)
