"""Token credit: how a sequence's advantage is shared among its tokens (ARCA and its baselines).

Source: ARCA paper, "Adapter-Residual Credit Assignment" (arXiv 2606.00257), and its authors' code
(github.com/rodlaf/tokenweighting, `experiment/hf/token_weights.py`). The estimator is token-weighted
REINFORCE with GRPO advantages and detached weights (ARCA paper, definition of the estimator):

    g = A(x, y) · Σ_t w_t ∇ log π_θ(y_t | y_<t, x),   w_t ≥ 0,  Σ_t w_t = 1,

with w_t obtained from a raw score α_t ≥ 0 by the within-trajectory normalisation
(ARCA paper, eq. "normalize").
Uniform credit w_t = 1/T is the usual length-normalised token-sum estimator.

Notation:
    B: completions in the batch
    T: padded completion length (right padding); T_i: number of valid tokens of row i
    d: hidden size; L: layers
    completion_mask: (B, T), 1/True on valid completion tokens (int or bool)
    per_token_logps: (B, T), log π_θ(y_t | ·) of the sampled tokens
    ref_per_token_logps: (B, T), log π_ref(y_t | ·) (same model, adapter disabled)
    entropies: (B, T), full-vocabulary entropy H_t of the distribution that samples y_t
    h_adapted, h_base: (B, T, d) or (L, B, T, d), hidden states at the position whose logits predict y_t
    branch_norms: (L, B, T), ‖s · B_ℓ A_ℓ x_ℓ,t‖₂, the per-layer LoRA-branch output norms
    α: raw scores (B, T); w: weights (B, T), each valid row sums to 1
    advantages: (B,), one GRPO advantage per completion

Position t's quantities are those of the logits that predict y_t. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch

CREDITS: tuple[str, ...] = ("uniform", "surprisal", "entropy_reduction", "divergence", "arca", "arca_branch")
"""Credit rules `compute_credit_weights` accepts."""

LAYER_AGGREGATES: tuple[str, ...] = ("mean", "max", "sum", "rms")
"""How `aggregate_layers` reduces per-layer scores (L, B, T) to (B, T)."""


def _bool_mask(completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool view of an int or bool mask."""
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be (B, T), got shape {tuple(completion_mask.shape)}")
    return completion_mask.bool()


def _check_bt(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.shape != mask.shape:
        raise ValueError(
            f"{name} must have the shape of completion_mask {tuple(mask.shape)}, got {tuple(x.shape)}"
        )


def surprisal_scores(per_token_logps: torch.Tensor) -> torch.Tensor:
    """α_t = −log π_θ(y_t | y_<t, x) under the current (adapted) policy (ARCA paper, baseline "surprisal")."""
    return -per_token_logps.float()  # (B, T)


def entropy_reduction_scores(entropies: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """α_t = max(0, H_t − H_{t+1}) (ARCA paper, baseline "entropy reduction"); the last valid token gets 0.

    H_{t+1} is taken at the next *valid* position after t (for right padding, simply t + 1). The authors'
    code shifts the whole padded row, so a row's last valid token is compared with a padding entropy (often
    0); here it gets 0, as the paper states. Invalid positions get 0.
    """
    mask = _bool_mask(completion_mask)
    _check_bt("entropies", entropies, mask)
    H = torch.where(mask, entropies.float(), 0.0)  # (B, T); padding may hold garbage or NaN
    B, T = mask.shape
    if T == 0:
        return H
    pos = torch.arange(T, device=mask.device).expand(B, T)
    valid_pos = torch.where(mask, pos, T)  # (B, T); T marks "no valid token here"
    # next_valid[t] = min_{s > t, mask[s]} s: reverse cumulative minimum of the positions shifted by one.
    shifted = torch.cat([valid_pos[:, 1:], valid_pos.new_full((B, 1), T)], dim=1)  # (B, T)
    next_valid = shifted.flip(1).cummin(dim=1).values.flip(1)  # (B, T)
    has_next = next_valid < T
    H_next = torch.gather(H, 1, next_valid.clamp(max=T - 1))  # (B, T)
    drops = (H - H_next).clamp_min(0.0)
    return torch.where(mask & has_next, drops, 0.0)


def divergence_scores(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """α_t = |log π_θ(y_t|·) − log π_ref(y_t|·)| (ARCA paper, baseline "policy divergence")."""
    return (per_token_logps.float() - ref_per_token_logps.float()).abs()  # (B, T)


def residual_scores(h_adapted: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """α_t = ‖h_t^adapted − h_t^base‖₂ over the last dim (ARCA paper, definition of the ARCA score).

    (..., B, T, d) → (..., B, T).

    The paper uses the last-layer hidden state only; passing (L, B, T, d) gives one score per layer.
    """
    if h_adapted.shape != h_base.shape:
        raise ValueError(
            "h_adapted and h_base must have the same shape, "
            f"got {tuple(h_adapted.shape)} and {tuple(h_base.shape)}"
        )
    return torch.linalg.vector_norm(h_adapted.float() - h_base.float(), ord=2, dim=-1)


def aggregate_layers(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce per-layer scores (L, B, T) to (B, T) with "mean" | "max" | "sum" | "rms" (our extension; the
    paper scores the last layer only)."""
    if how not in LAYER_AGGREGATES:
        raise ValueError(f"unknown layer aggregate {how!r}; accepted: {LAYER_AGGREGATES}")
    if scores.dim() != 3:
        raise ValueError(f"per-layer scores must be (L, B, T), got shape {tuple(scores.shape)}")
    s = scores.float()
    if how == "mean":
        return s.mean(dim=0)
    if how == "max":
        return s.amax(dim=0)
    if how == "sum":
        return s.sum(dim=0)
    return s.square().mean(dim=0).sqrt()  # rms


def _log_powered(scores: torch.Tensor, mask: torch.Tensor, sharpening: float, eps: float) -> torch.Tensor:
    """p · log(α_t + ε) on valid tokens, −inf elsewhere (B, T), float64: the log of the numerator of w_t."""
    alpha = torch.where(mask, scores.double().clamp_min(0.0), 0.0)  # where, not *, so NaN padding dies
    return torch.where(mask, sharpening * torch.log(alpha + eps), -torch.inf)


def fallback_rows(
    scores: torch.Tensor, completion_mask: torch.Tensor, sharpening: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """Rows whose normalisation falls back to uniform: Σ_k (α_k + ε)^p ≤ ε (ARCA paper's guard), or no valid
    token. (B,) bool.

    The guard compares a sum of powered scores with ε, so it is not scale-invariant: for p = 2, T = 24 and
    ε = 1e-8 every row whose scores are all below ≈ 2e-5 falls back (log it: `credit_fallback_fraction`).
    """
    mask = _bool_mask(completion_mask)
    _check_bt("scores", scores, mask)
    log_denom = torch.logsumexp(
        _log_powered(scores, mask, sharpening, eps), dim=-1
    )  # (B,); −inf on empty rows
    return log_denom <= (math.log(eps) if eps > 0 else -math.inf)


def normalize_scores(
    scores: torch.Tensor, completion_mask: torch.Tensor, sharpening: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """Within-trajectory normalisation (ARCA paper, eq. "normalize"; sharpening power from the authors' code):

        w_t = (α_t + ε)^p / Σ_k (α_k + ε)^p   over the row's valid tokens,  α clamped ≥ 0,  p = sharpening,

    computed in log space as softmax_t(p · log(α_t + ε)) in float64, so large α^p neither overflows nor gives
    NaN (α = 20, p = 30 is fine). If Σ_k (α_k + ε)^p ≤ ε (`fallback_rows`) the row falls back to uniform 1/T_i
    over its valid tokens (the paper's guard against all-zero scores); rows without valid tokens get zeros.
    Invalid positions get 0 whatever `scores` holds there (NaN/inf from padding included). The authors' runs
    used p = 2.0; our default is 1 (the paper's formula). Returns float32.
    """
    if not sharpening > 0:
        raise ValueError(f"sharpening must be > 0 (1.0 = the paper's normalisation), got {sharpening}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (the paper uses 1e-8), got {eps}")
    mask = _bool_mask(completion_mask)
    _check_bt("scores", scores, mask)
    log_num = _log_powered(scores, mask, sharpening, eps)  # (B, T)
    fallback = fallback_rows(scores, mask, sharpening, eps)[:, None]  # (B, 1); also catches empty rows
    n_valid = mask.sum(dim=-1, keepdim=True)  # (B, 1)
    uniform = mask.double() / n_valid.clamp_min(1).double()  # (B, T); zeros on empty rows
    safe = torch.where(fallback, 0.0, log_num)  # (B, T); avoids softmax over an all −inf row
    weights = torch.where(mask, torch.softmax(safe, dim=-1), 0.0)
    return torch.where(fallback, uniform, weights).float()


def token_advantages(
    advantages: torch.Tensor, weights: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token advantages A_{i,t} = A_i · T_i · w_{i,t} (0 at invalid positions).

    With TRL `loss_type="grpo"` (per-sequence length-normalised mean,
    loss_i = −(1/T_i) Σ_t A_{i,t} ratio_{i,t}) the on-policy gradient of row i is
    (1/T_i) Σ_t A_i T_i w_t ∇log π_t = A_i Σ_t w_t ∇log π_t, the ARCA estimator (ARCA paper, definition of
    the estimator). For any loss type it redistributes a sequence's credit among its tokens while keeping
    that loss type's per-sequence weight: Σ_t A_{i,t} = A_i T_i, as for the uniform token sum. Uniform
    weights (w = 1/T_i) give back A_i exactly. Since w ≥ 0, A_{i,t} has the sign of A_i, so PPO-style
    clipping acts on the same side as without credit.
    """
    mask = _bool_mask(completion_mask)
    _check_bt("weights", weights, mask)
    adv = advantages.float().reshape(-1)  # (B,); accepts (B,) or (B, 1)
    if adv.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages must have one value per row ({mask.shape[0]}), got shape {tuple(advantages.shape)}"
        )
    n_valid = mask.sum(dim=-1).float()  # (B,)
    per_token = adv[:, None] * n_valid[:, None] * weights.float()  # (B, T)
    return torch.where(mask, per_token, 0.0)


def _require(credit: str, **inputs: torch.Tensor | None) -> None:
    for name, value in inputs.items():
        if value is None:
            raise ValueError(f"credit {credit!r} needs `{name}`; pass it to compute_credit_weights")


def compute_credit_weights(
    credit: str,
    *,
    completion_mask: torch.Tensor,
    per_token_logps: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    h_adapted: torch.Tensor | None = None,
    h_base: torch.Tensor | None = None,
    branch_norms: torch.Tensor | None = None,
    layer_aggregate: str = "mean",
    sharpening: float = 1.0,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (B, T) and raw scores α (B, T) for the credit rule `credit` (one of `CREDITS`).

    - "uniform": w = 1/T_i on valid tokens, α = 0.
    - "surprisal" (per_token_logps), "entropy_reduction" (entropies), "divergence" (per_token_logps,
      ref_per_token_logps): the ARCA paper's output-distribution baselines.
    - "arca" (h_adapted, h_base): ‖h^adapted − h^base‖₂, (B, T, d) or per layer (L, B, T, d) reduced with
      `layer_aggregate`.
    - "arca_branch" (branch_norms (B, T), or (L, B, T) reduced with `layer_aggregate`): the trainer passes
      ‖J_N(u_t) D_t‖, the residual writers' summed LoRA outputs D_t through the final norm's Jacobian
      (`arca_lab.branch`, theory/arca_branch.md): the direct-path part of ARCA's residual (our variant).

    Both outputs are detached (the paper's weights are constants in the gradient), float32, and 0 at invalid
    positions.
    """
    if credit not in CREDITS:
        raise ValueError(f"unknown credit {credit!r}; accepted: {CREDITS}")
    if layer_aggregate not in LAYER_AGGREGATES:
        raise ValueError(f"unknown layer_aggregate {layer_aggregate!r}; accepted: {LAYER_AGGREGATES}")
    mask = _bool_mask(completion_mask)

    if credit == "uniform":
        scores = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        n_valid = mask.sum(dim=-1, keepdim=True).clamp_min(1).float()
        return mask.float() / n_valid, scores
    if credit == "surprisal":
        _require(credit, per_token_logps=per_token_logps)
        scores = surprisal_scores(per_token_logps)
    elif credit == "entropy_reduction":
        _require(credit, entropies=entropies)
        scores = entropy_reduction_scores(entropies, mask)
    elif credit == "divergence":
        _require(credit, per_token_logps=per_token_logps, ref_per_token_logps=ref_per_token_logps)
        scores = divergence_scores(per_token_logps, ref_per_token_logps)
    elif credit == "arca":
        _require(credit, h_adapted=h_adapted, h_base=h_base)
        if h_adapted.dim() not in (3, 4):
            raise ValueError(
                f"h_adapted must be (B, T, d) or (L, B, T, d), got shape {tuple(h_adapted.shape)}"
            )
        scores = residual_scores(h_adapted, h_base)  # (B, T) or (L, B, T)
        if scores.dim() == 3:
            scores = aggregate_layers(scores, layer_aggregate)
    else:  # arca_branch
        _require(credit, branch_norms=branch_norms)
        if branch_norms.dim() == 3:
            scores = aggregate_layers(branch_norms, layer_aggregate)
        elif branch_norms.dim() == 2:
            scores = branch_norms.float()
        else:
            raise ValueError(
                f"branch_norms must be (L, B, T) or (B, T), got shape {tuple(branch_norms.shape)}"
            )

    _check_bt(f"the {credit} scores", scores, mask)
    scores = scores.detach()
    weights = normalize_scores(scores, mask, sharpening=sharpening, eps=eps)
    return weights, torch.where(mask, scores, 0.0)
