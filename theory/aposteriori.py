"""A-posteriori KL bounds from a trained adapter, and the per-token credit link (theory/aposteriori.md).

Notation:
    ΔW = s·B A ∈ R^{V×d}    the adapter's weight change (rows ΔW_i); policy π_θ(·|x) = softmax((W₀ + ΔW) x / τ)
    D(M) = max_{i,j} ‖M_i − M_j‖₂    row diameter of a matrix M
    R                      input radius; for x = output of an RMSNorm with gain g ∈ R^d: R = √d·max_k |g_k| (P2)
    W_lm ∈ R^{V×d}, L = ‖W_lm‖₂;  Δh_t = h_t^adapted − h_t^base (input of lm_head at position t)
    α_div,t = |log π_θ(y_t) − log π_ref(y_t)|,  α_ARCA,t = ‖Δh_t‖₂   (ARCA paper, arXiv 2606.00257, §scores)
Results:
    P1  max_{‖x‖≤R} range(ΔW x)/τ = R·D(ΔW)/τ, exact (attained at x = R(ΔW_i − ΔW_j)/‖ΔW_i − ΔW_j‖).
    P2  ‖RMSNorm_g(h)‖₂ ≤ √d·max|g| for every h (tight as eps → 0).
    P3  for head-only LoRA and every x in the ball, both KL(π_ref‖π_θ) and KL(π_θ‖π_ref) (per token)
        are ≤ K(R·D(ΔW)/τ) ≤ (R·D(ΔW)/τ)²/8 (softmax_kl.md L3/L4).
    P4  α_div,t ≤ range(W_lm Δh_t)/τ ≤ D(W_lm)·α_ARCA,t/τ ≤ √2·L·α_ARCA,t/τ; √2 is the best constant, ARCA's
        Prop. 2 has 2 (loose by √2).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from theory.softmax_kl import kl_range_bound, kl_ref_theta, kl_sharp_bound, kl_theta_ref, logit_range


# ---------------------------------------------------------------- row diameter (exact, pruned)
def row_diameter(Y: Any, block: int = 256) -> tuple[float, int, int]:
    """Exact D(Y) = max_{i,j} ‖Y_i − Y_j‖₂ and a maximising pair (i, j).

    Branch and bound around the centroid c: ‖Y_i − Y_j‖ ≤ ‖Y_i − c‖ + ‖Y_j − c‖, so with rows sorted by
    their distance to c only pairs whose sum beats the best distance found so far are computed. Worst case
    O(V²·k) (all rows equidistant from c), typically far less.
    """
    Y = np.asarray(Y, dtype=float)
    if Y.ndim != 2 or Y.shape[0] < 1:
        raise ValueError(f"Y must be a 2-D array (rows, features) with >= 1 row, got shape {Y.shape}")
    if Y.shape[0] == 1:
        return 0.0, 0, 0
    Yc = Y - Y.mean(axis=0)
    rad = np.linalg.norm(Yc, axis=1)
    order = np.argsort(-rad, kind="stable")
    Ys, rs = Yc[order], rad[order]
    sq = rs**2
    # initial candidate: the farthest row from c against all rows
    d0 = np.linalg.norm(Ys - Ys[0], axis=1)
    j0 = int(np.argmax(d0))
    best, bi, bj = float(d0[j0]), 0, j0
    for start in range(0, Ys.shape[0], block):
        if rs[start] + rs[0] <= best:
            break  # every remaining pair has distance ≤ rs[start] + rs[0] ≤ best
        stop = min(start + block, Ys.shape[0])
        # prefix of rows that can pair with some row of this block to beat `best`
        npre = int(np.searchsorted(-rs, -(best - rs[start]), side="right"))
        if npre == 0:
            continue
        for j0 in range(0, npre, 8192):  # chunk the prefix too: (block, 8192) doubles at most
            j1 = min(j0 + 8192, npre)
            g = sq[start:stop, None] + sq[None, j0:j1] - 2.0 * Ys[start:stop] @ Ys[j0:j1].T  # squared dists
            i, j = divmod(int(np.argmax(g)), j1 - j0)
            cand = float(
                np.linalg.norm(Ys[start + i] - Ys[j0 + j])
            )  # recompute the winner without cancellation
            if cand > best:
                best, bi, bj = cand, start + i, j0 + j
    return best, int(order[bi]), int(order[bj])


def lora_delta_w(B: Any, A: Any, scale: float) -> np.ndarray:
    """ΔW = s·B A (peft: lora_B.weight (V×r) @ lora_A.weight (r×d) · scaling)."""
    return float(scale) * np.asarray(B, dtype=float) @ np.asarray(A, dtype=float)


def lora_row_diameter(B: Any, A: Any, scale: float) -> tuple[float, int, int]:
    """D(s·B A) computed in r dimensions: ‖(B_i − B_j) A‖ = ‖(B_i − B_j) U √Λ‖ with A Aᵀ = U Λ Uᵀ."""
    A = np.asarray(A, dtype=float)
    lam, U = np.linalg.eigh(A @ A.T)  # (r,), (r, r)
    Y = np.asarray(B, dtype=float) @ (U * np.sqrt(np.clip(lam, 0.0, None)))  # (V, r)
    dist, i, j = row_diameter(Y)
    return abs(float(scale)) * dist, i, j


# ---------------------------------------------------------------- P2: RMSNorm radius
def rmsnorm_radius(gain: Any) -> float:
    """R = √d·max_k |g_k| ≥ ‖g ⊙ h / rms(h)‖₂ for every h ∈ R^d (P2). Pass the effective gain
    (e.g. 1 + weight for Gemma-style norms)."""
    g = np.asarray(gain, dtype=float).ravel()
    return float(np.sqrt(g.size) * np.max(np.abs(g)))


# ---------------------------------------------------------------- P1 / P3: head-only LoRA, whole ball
def aposteriori_kl_bound(
    delta_w: Any | None = None,
    *,
    B: Any | None = None,
    A: Any | None = None,
    scale: float = 1.0,
    input_radius: float | None = None,
    norm_weight: Any | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Bounds on max_{‖x‖≤R} KL for head-only LoRA (x = input of lm_head), both directions, per token.

    Give either `delta_w` (V×d) or the factors `B` (V×r), `A` (r×d) and `scale` (cheaper: works in r dims).
    R is `input_radius`, or if None the RMSNorm bound √d·max|g| from `norm_weight` (P2).
    Returns logit_range = R·D(ΔW)/τ (exact max over the ball, P1), the maximising rows (i, j) and input x_star,
    kl_ref_theta / kl_theta_ref = K(logit_range) (sharp, P3) and *_range_sq_over_8.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if input_radius is None:
        if norm_weight is None:
            raise ValueError("give input_radius, or norm_weight (the final RMSNorm gain) to derive it")
        input_radius = rmsnorm_radius(norm_weight)
    if input_radius < 0:
        raise ValueError(f"input_radius must be >= 0, got {input_radius!r}")
    if delta_w is not None:
        dw = np.asarray(delta_w, dtype=float)
        diam, i, j = row_diameter(dw)
        diff = dw[i] - dw[j]
    elif B is not None and A is not None:
        diam, i, j = lora_row_diameter(B, A, scale)
        diff = (
            float(scale)
            * (np.asarray(B, dtype=float)[i] - np.asarray(B, dtype=float)[j])
            @ np.asarray(A, float)
        )
    else:
        raise ValueError("give delta_w (V×d), or both B (V×r) and A (r×d) with scale")
    norm = np.linalg.norm(diff)
    x_star = input_radius * diff / norm if norm > 0 else np.zeros_like(diff)
    rho = float(input_radius) * diam / temperature
    sharp, hoeff = float(kl_sharp_bound(rho)), float(kl_range_bound(rho))
    return {
        "input_radius": float(input_radius),
        "row_diameter": diam,
        "argmax_rows": (i, j),
        "x_star": x_star,
        "logit_range": rho,
        "kl_ref_theta": sharp,  # bound on KL(π_ref‖π_θ) per token, any x in the ball
        "kl_theta_ref": sharp,  # bound on KL(π_θ‖π_ref) per token
        "kl_ref_theta_range_sq_over_8": hoeff,
        "kl_theta_ref_range_sq_over_8": hoeff,
    }


def per_token_kl_bound(
    delta_w: Any, x: Any, temperature: float = 1.0, base_weight: Any | None = None
) -> dict[str, np.ndarray]:
    """Per-token bounds for actual inputs x_t (rows of x, (N, d)): range_t = range(ΔW x_t)/τ, K(range_t),
    range_t²/8 (both KL directions). With `base_weight` W₀ (V×d) also the exact per-token KLs
    kl_ref_theta_exact = KL(π_ref‖π_θ) and kl_theta_ref_exact = KL(π_θ‖π_ref)."""
    dw = np.asarray(delta_w, dtype=float)
    x = np.atleast_2d(np.asarray(x, dtype=float))  # (N, d)
    z = x @ dw.T  # (N, V) logit shift before temperature
    rho = logit_range(z, temperature)
    out = {"logit_range": rho, "kl_sharp": kl_sharp_bound(rho), "kl_range_sq_over_8": kl_range_bound(rho)}
    if base_weight is not None:
        a = x @ np.asarray(base_weight, dtype=float).T  # (N, V)
        out["kl_ref_theta_exact"] = kl_ref_theta(a, z, temperature)
        out["kl_theta_ref_exact"] = kl_theta_ref(a, z, temperature)
    return out


# ---------------------------------------------------------------- P4: credit link (all-layer LoRA)
def spectral_norm(W: Any) -> float:
    """‖W‖₂ (largest singular value): dense SVD for small matrices, Lanczos (scipy svds) for large."""
    W = np.asarray(W, dtype=float)
    if min(W.shape) <= 512:
        return float(np.linalg.norm(W, 2))
    from scipy.sparse.linalg import svds

    return float(svds(W, k=1, tol=0, return_singular_vectors=False, random_state=0)[0])


def credit_link_bound(
    W_lm: Any,
    dh: Any,
    logp_diff: Any,
    temperature: float = 1.0,
    op_norm: float | None = None,
    row_diam: float | bool | None = None,
    chunk: int = 64,
) -> dict[str, Any]:
    """Per-token chain α_div,t ≤ range(W_lm Δh_t)/τ ≤ D(W_lm)‖Δh_t‖/τ ≤ √2 L ‖Δh_t‖/τ (P4), lm_head unadapted.

    W_lm (V×d) lm_head weight; dh (N×d) change of the lm_head input (α_ARCA,t = ‖dh_t‖₂); logp_diff (N,)
    log π_θ(y_t) − log π_ref(y_t) at temperature τ. `op_norm` = L if known (else computed); `row_diam`:
    a number = D(W_lm) if known, True = compute exactly, None = compute if V ≤ 20 000, False = skip.
    Returns per-token arrays alpha_div, alpha_arca, range_bound, diameter_bound, op_bound (√2 L‖Δh‖/τ),
    prop2_bound (2 L‖Δh‖/τ, ARCA Prop. 2 with β = ‖Δh_t‖), kl_sharp (K(range), both KL directions), and
    `holds` (all inequalities of the chain hold for every token, up to 1e-9 relative slack).
    """
    W = np.asarray(W_lm, dtype=float)
    dh = np.atleast_2d(np.asarray(dh, dtype=float))
    alpha_div = np.abs(np.asarray(logp_diff, dtype=float)).ravel()
    if dh.shape[1] != W.shape[1] or alpha_div.shape[0] != dh.shape[0]:
        raise ValueError(
            f"need W_lm (V, d), dh (N, d), logp_diff (N,); got {W.shape}, {dh.shape}, {alpha_div.shape}"
        )
    rng = np.concatenate(
        [logit_range(dh[k : k + chunk] @ W.T, temperature) for k in range(0, len(dh), chunk)]
    )
    L = spectral_norm(W) if op_norm is None else float(op_norm)
    alpha_arca = np.linalg.norm(dh, axis=1)
    if row_diam is None:
        row_diam = W.shape[0] <= 20_000
    diam = row_diameter(W)[0] if row_diam is True else (float(row_diam) if row_diam is not False else np.nan)
    out = {
        "alpha_div": alpha_div,
        "alpha_arca": alpha_arca,
        "range_bound": rng,
        "diameter_bound": diam * alpha_arca / temperature,
        "op_bound": np.sqrt(2) * L * alpha_arca / temperature,
        "prop2_bound": 2 * L * alpha_arca / temperature,
        "kl_sharp": kl_sharp_bound(rng),
        "op_norm": L,
        "row_diameter": diam,
    }
    slack = 1 + 1e-9
    chain = [out["alpha_div"], out["range_bound"]]
    if not np.isnan(diam):
        chain.append(out["diameter_bound"])
    chain.append(out["op_bound"])
    out["holds"] = bool(all(np.all(lo <= hi * slack + 1e-12) for lo, hi in itertools.pairwise(chain)))
    return out
