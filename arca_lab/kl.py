"""KL probe between the policy π_θ and the base model π_ref (same model, adapter disabled).

Exact full-vocabulary KL per position plus the sampled-token estimators GRPO trainers use, so one can see both
what the KL *is* along the sampled prefixes and what the usual estimators report.

Sources:
- Exact KL of two softmaxes, in float32 via log_softmax: for p = softmax(a), q = softmax(b),
  KL(p‖q) = Σ_v p_v (log p_v − log q_v). With b = a + z, KL = lse(a+z) − lse(a) − pᵀz ≤ (max z − min z)²/8
  (softmax KL identity; research notes `papers.md` §2 "Useful facts", our derivation).
- k1 = log π_θ − log π_ref and k3 = r − log r − 1 with r = π_ref/π_θ, unbiased estimators of KL(π_θ‖π_ref)
  on tokens sampled from π_θ (J. Schulman, "Approximating KL divergence", 2020; k3 is what TRL's GRPOTrainer
  computes as `per_token_kl`).
Sequence-level KL (chain rule of KL): KL(P‖Q) over completions = E_{y~P} Σ_t KL(P(·|y_<t) ‖ Q(·|y_<t)).
- KL(π_θ‖π_ref): completions are sampled from π_θ, so Σ_t kl_policy_ref_t is an unbiased estimate per sequence.
- KL(π_ref‖π_θ): the expectation is over π_ref, not over the sampler. Importance weighting each term by its
  prefix's likelihood ratio, ρ_<t = Π_{s<t} π_ref(y_s)/π_θ(y_s), gives the unbiased estimate
  Σ_t ρ_<t · kl_ref_policy_t (our derivation: E_{y~π_θ}[ρ_<t f(y_<t)] = E_{y~π_ref}[f(y_<t)] for any f of the
  prefix). Summing kl_ref_policy_t unweighted, as earlier versions did, estimates a different quantity.
Both hold only when completions are sampled from π_θ at temperature 1 without top-p/top-k truncation (the
trainer logs NaN for the sequence estimates otherwise).

Notation:
    B: completions in the batch; T: padded completion length; V: vocabulary size
    policy_logits, ref_logits: (B, T, V), logits at the positions that predict completion token y_t
    completion_ids: (B, T) int, the sampled tokens y_t; completion_mask: (B, T), 1/True on valid tokens
    per_token_logps, ref_per_token_logps: (B, T), log-probs of y_t under π_θ and π_ref
All outputs are float32 whatever the input dtype; the caller applies any sampling temperature to the logits.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK = 256
"""Positions per chunk in `token_kl` / `kl_probe`: 256 × V float32 working arrays (~150 MB at V = 151k)."""

KL_NAMES: tuple[str, ...] = ("kl_policy_ref", "kl_ref_policy", "k1", "k3")
"""The KL tensors of `kl_probe` that `summarize_kl` reports."""
SUMMARY_NAMES: dict[str, str] = {
    "kl_policy_ref": "policy_ref",
    "kl_ref_policy": "ref_policy",
    "k1": "k1",
    "k3": "k3",
}
"""Probe tensor -> logged name: `summarize_kl` keys are "kl/<logged name>/<stat>" (run.nc: kl_<name>_<stat>)."""


def _kl_from_logps(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v − log q_v) over the last dim, with 0·log 0 = 0 (−inf logits allowed where p = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(dim=-1)


def _chunk_step(chunk_size: int | None, n: int) -> int:
    if chunk_size is None:
        return max(n, 1)
    if int(chunk_size) < 1:
        raise ValueError(
            f"chunk_size must be a positive int or None (all positions at once), got {chunk_size}"
        )
    return int(chunk_size)


def token_kl(
    logits_p: torch.Tensor, logits_q: torch.Tensor, *, chunk_size: int | None = DEFAULT_CHUNK
) -> torch.Tensor:
    """Exact KL(softmax(logits_p) ‖ softmax(logits_q)) per position over the vocabulary. (B, T, V) → (B, T).

    `chunk_size` (positions per chunk) bounds the float32 working memory for large V (and is faster than one
    big block on CPU); None = all at once.
    """
    if logits_p.shape != logits_q.shape or logits_p.dim() < 1:
        raise ValueError(
            f"logits_p and logits_q must have equal shapes (..., V), got {tuple(logits_p.shape)} "
            f"and {tuple(logits_q.shape)}"
        )
    V = logits_p.shape[-1]
    flat_p, flat_q = logits_p.reshape(-1, V), logits_q.reshape(-1, V)  # (N, V)
    step = _chunk_step(chunk_size, flat_p.shape[0])
    out = torch.empty(flat_p.shape[0], dtype=torch.float32, device=logits_p.device)  # (N,)
    for s in range(0, flat_p.shape[0], step):
        lp = torch.log_softmax(flat_p[s : s + step].float(), dim=-1)
        lq = torch.log_softmax(flat_q[s : s + step].float(), dim=-1)
        out[s : s + step] = _kl_from_logps(lp, lq)
    return out.reshape(logits_p.shape[:-1])


def k1_k3(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token estimators of KL(π_θ‖π_ref) for y_t ~ π_θ (Schulman 2020; TRL GRPO's `per_token_kl`).

    k1 = log π_θ − log π_ref (unbiased, can be negative); k3 = exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ
    (unbiased, ≥ 0 since e^Δ ≥ 1 + Δ). Both (B, T).
    """
    logp, ref = per_token_logps.float(), ref_per_token_logps.float()
    k1 = logp - ref
    delta = ref - logp
    k3 = torch.exp(delta) - delta - 1.0
    return k1, k3


@torch.no_grad()
def kl_probe(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> dict[str, torch.Tensor]:
    """Per-token KL quantities (each (B, T), float32, 0 at invalid positions, no autograd graph).

    Keys: "kl_policy_ref" = KL(π_θ‖π_ref), "kl_ref_policy" = KL(π_ref‖π_θ) (exact, full vocabulary), "k1",
    "k3" (sampled-token estimators), "policy_logps", "ref_logps" (log-probs of y_t), "policy_entropy"
    (full-vocabulary entropy of π_θ). Only valid positions are computed, `chunk_size` of them at a time
    (None = all at once).
    """
    if policy_logits.dim() != 3 or policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits and ref_logits must both be (B, T, V), got {tuple(policy_logits.shape)} "
            f"and {tuple(ref_logits.shape)}"
        )
    B, T, V = policy_logits.shape
    if completion_ids.shape != (B, T) or completion_mask.shape != (B, T):
        raise ValueError(
            f"completion_ids and completion_mask must be (B, T) = {(B, T)}, "
            f"got {tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    mask = completion_mask.bool()
    ids = completion_ids[mask].long()  # (N,) valid positions only
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"completion_ids at valid positions must lie in [0, V={V})")
    # Index the valid rows chunk by chunk rather than copying all of them: logits are the big tensors here.
    pol, ref = policy_logits.reshape(B * T, V), ref_logits.reshape(B * T, V)  # (B·T, V), views if contiguous
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # (N,) flat indices of the valid positions
    N = ids.shape[0]
    step = _chunk_step(chunk_size, N)
    cols = {
        k: torch.zeros(N, dtype=torch.float32, device=pol.device) for k in ("pr", "rp", "lp", "lr", "ent")
    }
    for s in range(0, N, step):
        lp = torch.log_softmax(pol[rows[s : s + step]].float(), dim=-1)  # (n, V)
        lr = torch.log_softmax(ref[rows[s : s + step]].float(), dim=-1)  # (n, V)
        y = ids[s : s + step, None]  # (n, 1)
        cols["pr"][s : s + step] = _kl_from_logps(lp, lr)
        cols["rp"][s : s + step] = _kl_from_logps(lr, lp)
        cols["lp"][s : s + step] = lp.gather(-1, y).squeeze(-1)
        cols["lr"][s : s + step] = lr.gather(-1, y).squeeze(-1)
        p = lp.exp()
        cols["ent"][s : s + step] = -torch.where(p > 0, p * lp, 0.0).sum(dim=-1)

    def scatter(vals: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(B, T, dtype=torch.float32, device=vals.device)
        full[mask] = vals
        return full  # (B, T)

    policy_logps, ref_logps = scatter(cols["lp"]), scatter(cols["lr"])
    k1, k3 = k1_k3(policy_logps, ref_logps)  # zero where both logps are zero, i.e. at invalid positions
    return {
        "kl_policy_ref": scatter(cols["pr"]),
        "kl_ref_policy": scatter(cols["rp"]),
        "k1": torch.where(mask, k1, 0.0),
        "k3": torch.where(mask, k3, 0.0),
        "policy_logps": policy_logps,
        "ref_logps": ref_logps,
        "policy_entropy": scatter(cols["ent"]),
    }


def prefix_weights(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """ρ_<t = Π_{s<t, valid} π_ref(y_s)/π_θ(y_s), the likelihood ratio of each token's prefix. (B, T), float64.

    ρ_<1 = 1. With y ~ π_θ, E[ρ_<t f(y_<t)] = E_{y~π_ref}[f(y_<t)] (importance sampling over prefixes; module
    docstring). Computed in float64 from the cumulative log-ratio, so long completions do not underflow early.
    """
    mask = completion_mask.bool()
    log_ratio = torch.where(mask, ref_per_token_logps.double() - per_token_logps.double(), 0.0)  # (B, T)
    before = torch.cumsum(log_ratio, dim=-1) - log_ratio  # (B, T): Σ_{s<t}
    return torch.exp(before)


def summarize_kl(
    probe: dict[str, torch.Tensor], completion_mask: torch.Tensor, *, sequence_estimates: bool = True
) -> dict[str, float]:
    """Plain-float summaries of the four KL tensors of `kl_probe`, keyed "kl/<name>/<stat>" with <name> from
    SUMMARY_NAMES (policy_ref, ref_policy, k1, k3):

    - "mean": mean over all valid tokens of the given rows;
    - "max": max over the same tokens;
    - "seq_mean": mean over rows with a valid token of a per-sequence estimate of the sequence-level KL:
      Σ_t x_t for policy_ref, k1 and k3 (samples from π_θ); Σ_t ρ_<t x_t for ref_policy (importance-weighted,
      see `prefix_weights`; needs "policy_logps" and "ref_logps" in `probe`). NaN when `sequence_estimates` is
      False (the completions were not sampled from π_θ at temperature 1).
    NaN when the rows hold no valid token.
    """
    mask = completion_mask.bool()
    has_token = mask.any(dim=-1)  # (B,)
    out: dict[str, float] = {}
    for name in KL_NAMES:
        if name not in probe:
            raise ValueError(f"probe lacks {name!r}; expected the keys of kl_probe, including {KL_NAMES}")
        x = probe[name].float()
        if x.shape != mask.shape:
            raise ValueError(f"probe[{name!r}] must have the shape of completion_mask {tuple(mask.shape)}")
        vals = x[mask]
        empty = vals.numel() == 0
        key = f"kl/{SUMMARY_NAMES[name]}"
        out[f"{key}/mean"] = math.nan if empty else float(vals.mean())
        out[f"{key}/max"] = math.nan if empty else float(vals.max())
        if empty or not sequence_estimates:
            out[f"{key}/seq_mean"] = math.nan
            continue
        terms = torch.where(mask, x.double(), 0.0)  # (B, T)
        if name == "kl_ref_policy":
            if "policy_logps" not in probe or "ref_logps" not in probe:
                raise ValueError(
                    "the ref_policy sequence estimate needs probe['policy_logps'] and ['ref_logps']"
                )
            terms = terms * prefix_weights(probe["policy_logps"], probe["ref_logps"], mask)
        out[f"{key}/seq_mean"] = float(terms.sum(dim=-1)[has_token].mean())
    return out
