"""How concentrated token credit is: Gini, effective tokens, credit mass per token role.

Source: ARCA paper (arXiv 2606.00257), diagnostics "Gini" and "effective-token ratio" (per sequence over
its valid tokens, then averaged over sequences; the Gini average only over sequences with n > 1). Role mass
is ours: how much credit lands on task-agnostic positions (`format`) vs reasoning (`work`) vs the final
answer (`answer`), the roles of `arca_lab.tasks.base.ROLES`.

Notation:
    B: completions in the batch; T: padded completion length
    weights: (B, T), token credit w ≥ 0 (from `arca_lab.credit`; valid rows usually sum to 1)
    completion_mask: (B, T), 1/True on valid completion tokens (int or bool)
    n = T_i: number of valid tokens of row i
    roles: (B, T) int, role id per token (index into ROLES); ignored at invalid positions
    Per-row outputs are (B,), NaN where the quantity is undefined (no valid token, or n ≤ 1 for Gini).
"""

from __future__ import annotations

import math

import torch

from arca_lab.tasks.base import ROLES


def _bool_mask(completion_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if completion_mask.dim() != 2 or completion_mask.shape != weights.shape:
        raise ValueError(
            f"weights and completion_mask must both be (B, T) with equal shapes, "
            f"got {tuple(weights.shape)} and {tuple(completion_mask.shape)}"
        )
    return completion_mask.bool()


def gini(weights: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Gini coefficient per row (ARCA paper, diagnostic "Gini"):

        G = Σ_i (2i − n − 1) w_(i) / (n Σ_i w_i),   w_(1) ≤ … ≤ w_(n) the valid weights, i = 1..n.

    0 = uniform, (n − 1)/n = one-hot. NaN for rows with n ≤ 1 or Σ w = 0. (B,)
    Computed in float64 as Σ_i (2i − n − 1)(w_(i) − w_(1)) (equal, since Σ_i (2i − n − 1) = 0), so equal
    weights give exactly 0, and clamped at 0 (G ≥ 0; rounding could otherwise give −1e-10).
    """
    mask = _bool_mask(completion_mask, weights)
    w = weights.double()
    T = w.shape[-1]
    # Push invalid entries to the end of the ascending sort so the valid ones occupy ranks 1..n.
    sorted_w = torch.where(mask, w, math.inf).sort(dim=-1).values  # (B, T)
    n = mask.sum(dim=-1, keepdim=True)  # (B, 1)
    rank = torch.arange(1, T + 1, device=w.device).expand_as(sorted_w)  # (B, T), i = 1..T
    in_row = rank <= n
    sorted_w = torch.where(in_row, sorted_w, 0.0)
    excess = torch.where(in_row, sorted_w - sorted_w[:, :1], 0.0)  # (B, T): w_(i) − w_(1) ≥ 0
    coef = (2 * rank - n - 1).double()  # (B, T)
    numer = (coef * excess).sum(dim=-1).clamp_min(0.0)  # (B,)
    denom = n.squeeze(-1).double() * sorted_w.sum(dim=-1)  # (B,)
    defined = (n.squeeze(-1) > 1) & (denom > 0)
    return torch.where(defined, numer / torch.where(defined, denom, 1.0), math.nan).float()


def effective_tokens(weights: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """EffN = (Σ w)² / Σ w² over valid tokens (= 1 / Σ w² when Σ w = 1; ARCA paper, "effective-token ratio").

    n for uniform weights, 1 for one-hot. NaN for rows with no valid token or all-zero weights. (B,)
    """
    mask = _bool_mask(completion_mask, weights)
    w = torch.where(mask, weights.float(), 0.0)  # (B, T)
    s1 = w.sum(dim=-1)
    s2 = w.square().sum(dim=-1)
    return torch.where(s2 > 0, s1.square() / torch.where(s2 > 0, s2, 1.0), math.nan)


def etr(weights: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Effective-token ratio ETR = EffN / T_i (ARCA paper): 1 = uniform, 1/T_i = one-hot. (B,)"""
    mask = _bool_mask(completion_mask, weights)
    return effective_tokens(weights, mask) / mask.sum(dim=-1).float()  # NaN/0 → NaN on empty rows


def role_mass(
    weights: torch.Tensor, roles: torch.Tensor, completion_mask: torch.Tensor, n_roles: int = 3
) -> torch.Tensor:
    """Credit mass per role: out[i, r] = Σ_{t valid, roles[i, t] = r} w_{i, t}. (B, n_roles)

    With weights summing to 1 per row this is the fraction of the row's credit on each role. Role ids at valid
    positions must lie in [0, n_roles); invalid positions are ignored whatever they hold (e.g. −1 padding).
    """
    mask = _bool_mask(completion_mask, weights)
    if roles.shape != mask.shape:
        raise ValueError(
            f"roles must have the shape of weights {tuple(mask.shape)}, got {tuple(roles.shape)}"
        )
    r = torch.where(mask, roles.long(), 0)  # (B, T)
    if bool(((r < 0) | (r >= n_roles)).any()):
        raise ValueError(
            f"role ids at valid positions must lie in [0, {n_roles}) (indices into ROLES={ROLES})"
        )
    w = torch.where(mask, weights.float(), 0.0)  # (B, T)
    out = torch.zeros(mask.shape[0], n_roles, dtype=torch.float32, device=w.device)
    return out.scatter_add_(1, r, w)


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if x.numel() else math.nan


def summarize_credit(
    weights: torch.Tensor,
    completion_mask: torch.Tensor,
    roles: torch.Tensor | None = None,
    raw_scores: torch.Tensor | None = None,
    fallback: torch.Tensor | None = None,
) -> dict[str, float]:
    """Batch means of the credit diagnostics, as plain floats (for logging).

    Keys: "gini" (mean over rows with n > 1), "etr", "effn" (mean over rows with a valid token), "tokens"
    (mean T_i over all rows), "role_mass/<role>" for each role of ROLES (mean over rows with a valid token)
    when `roles` is given, and "score/mean", "score/std" (population std), "score/max" over all valid tokens
    of the batch when `raw_scores` is given, and "fallback_fraction" (fraction of rows with a valid token whose
    normalisation fell back to uniform, `arca_lab.credit.fallback_rows`) when `fallback` (B,) is given.
    A key with nothing to average is NaN.
    """
    mask = _bool_mask(completion_mask, weights)
    has_token = mask.any(dim=-1)  # (B,)
    out = {
        "gini": _nanmean(gini(weights, mask)),
        "etr": _nanmean(etr(weights, mask)),
        "effn": _nanmean(effective_tokens(weights, mask)),
        "tokens": float(mask.sum(dim=-1).float().mean()) if mask.shape[0] else math.nan,
    }
    if roles is not None:
        mass = role_mass(weights, roles, mask, n_roles=len(ROLES))[has_token]  # (B', n_roles)
        for k, name in enumerate(ROLES):
            out[f"role_mass/{name}"] = float(mass[:, k].mean()) if mass.shape[0] else math.nan
    if raw_scores is not None:
        if raw_scores.shape != mask.shape:
            raise ValueError(
                f"raw_scores must have the shape of weights {tuple(mask.shape)}, "
                f"got {tuple(raw_scores.shape)}"
            )
        vals = raw_scores.float()[mask]  # (N_valid,)
        empty = vals.numel() == 0
        out["score/mean"] = math.nan if empty else float(vals.mean())
        out["score/std"] = math.nan if empty else float(vals.std(correction=0))
        out["score/max"] = math.nan if empty else float(vals.max())
    if fallback is not None:
        fell = fallback.reshape(-1).bool()[has_token]  # (B',)
        out["fallback_fraction"] = float(fell.float().mean()) if fell.numel() else math.nan
    return out
