"""A fixed held-out context set and the exact float64 KL of any trained adapter on it (the prediction study).

Every run of `arca-lab sweep --preset prediction` is measured on the same rows, so measured KLs compare across
ranks, learning rates, seeds and checkpoints (one sample for all of them):

    rows   = the completion-predicting positions of the base model's greedy completions (up to and including the
             first EOS, TRL's completion mask) of the first `n_prompts` held-out prompts (task.eval_rows(n, seed=0))
    x      = lm_head's input at those rows in the base model, eval mode (no dropout), float32 forward, kept as float64

The measured quantity is the exact KL after the final (or a checkpointed) update, mean over rows, float64:

    kl_ref_theta = mean_rows Σ_v π_ref,v (log π_ref,v − log π_θ,v),   kl_theta_ref the other direction
    π_ref = softmax(W₀ x / τ),   π_θ = softmax((W₀ + s·B·A) x_θ / τ)                 (theory/softmax_kl.md L1)

For a head-only adapter x_θ = x (the backbone is untouched), so the KL is pure float64 algebra on the saved LoRA
factors (no model forward). Other adapters run one float32 forward of the adapted model for x_θ. The per-step KL
probe of run.nc is a different quantity: it sees the policy before each update, on that step's sampled completions.

Notation: N rows, d lm_head input size, V vocabulary, τ temperature, s LoRA scale (adapter_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from arca_lab.analysis.heldout_kl import _completion_mask
from arca_lab.models import base_head, lm_head_of, logit_transform
from theory.bandit import kl_pair

FP64_FLOOR = 1e-13
"""Numerical floor of one measured mean KL (float64): each of the V = 17 terms of Σ_v p_v (log p_v − log q_v)
carries a rounding of about 2.2e-16 · |log p_v| ≤ 2.2e-16 · 40, so the sum is exact to ~1.5e-13 at worst."""


@dataclass
class ContextSet:
    """The fixed rows: inputs x (N, d) float64, the sequences they come from, and the base head W₀ (V, d)."""

    x: np.ndarray  # (N, d) base lm_head inputs at the rows
    w0: np.ndarray  # (V, d) frozen head weight
    input_ids: torch.Tensor  # (n_prompts, L) prompt + greedy completion, left-padded
    attention_mask: torch.Tensor  # (n_prompts, L)
    rows: torch.Tensor  # (n_prompts, L) bool: the positions whose next-token distribution is a row

    @property
    def rms_radius(self) -> float:
        """√(mean_rows ‖x‖²): the radius R of the law's contexts (theory/rank_scaling.md §10, ‖x‖ = R)."""
        return float(np.sqrt(np.mean(np.sum(self.x**2, axis=1))))

    def ref_logit_std(self) -> float:
        """RMS over actions of the std over rows of the base logits W₀x (before τ): predict_kl's ref_logit_std."""
        return float(np.sqrt(np.mean(np.var(self.x @ self.w0.T, axis=0))))


@torch.no_grad()
def build_context_set(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> ContextSet:
    """Greedy completions of `prompts` by the (base) `model` and its lm_head inputs at the completion rows."""
    head = base_head(model)
    if getattr(head, "bias", None) is not None or logit_transform(model) != (1.0, None):
        raise ValueError(
            "the context set assumes logits = W₀x (no lm_head bias, logit scale or soft-capping): use "
            "arca_lab.analysis.heldout_kl.measure_tokens for this model"
        )
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer(text=prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )  # (n, P + T)
    T = out.size(1) - enc["input_ids"].size(1)
    cmask = _completion_mask(out[:, -T:], tokenizer.eos_token_id)  # (n, T)
    attn = torch.cat([enc["attention_mask"], cmask], 1)  # (n, P + T)
    # Row t predicts completion token t: it sits at position P − 1 + t (the token before it).
    rows = torch.zeros_like(attn, dtype=torch.bool)
    rows[:, -T - 1 : -1] = cmask.bool()
    x = lm_head_inputs(model, out, attn)[rows]  # (N, d)
    return ContextSet(x.double().numpy(), base_head(model).weight.detach().double().numpy(), out, attn, rows)


def lm_head_inputs(model: Any, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """lm_head's input at every position, (n, L, d), from one forward (hook on the head)."""
    store: dict[str, torch.Tensor] = {}
    hook = lm_head_of(model).register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach()))
    try:
        model(input_ids=ids, attention_mask=attn)
    finally:
        hook.remove()
    return store["x"]


def kl_pair64(z_ref: np.ndarray, z_pol: np.ndarray) -> tuple[float, float]:
    """(mean KL(π_ref‖π_θ), mean KL(π_θ‖π_ref)) over rows of two (N, V) float64 logit arrays already divided by τ
    (theory.bandit.kl_pair, the exact per-row KL of a logit shift)."""
    fwd, bwd = kl_pair(z_ref, z_pol - z_ref)
    return float(np.mean(fwd)), float(np.mean(bwd))


def head_delta(adapter_dir: str | Path) -> np.ndarray | None:
    """ΔW = s·B·A (V, d) float64 of lm_head from a saved peft adapter; None if lm_head is not adapted."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern") if cfg.get(k)]
    if unsupported:
        raise ValueError(f"{adapter_dir}: {unsupported} set; ΔW = s·B·A with one r and α is all this reads")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = [k for k in tensors if k.endswith("lm_head.lora_A.weight")]
    if not a:
        if is_head_only(adapter_dir):
            raise ValueError(f"{adapter_dir} targets lm_head but holds no lm_head.lora_A weight")
        return None
    A = tensors[a[0]].double().numpy()  # (r, d)
    B = tensors[a[0].replace("lora_A", "lora_B")].double().numpy()  # (V, r)
    r = A.shape[0]
    s = cfg["lora_alpha"] / (np.sqrt(r) if cfg.get("use_rslora") else r)  # peft's LoraLayer.scaling
    return s * B @ A


def is_head_only(adapter_dir: str | Path) -> bool:
    """True when the adapter's only target is lm_head (then x_θ = x and no forward is needed)."""
    targets = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    return targets == ["lm_head"]


def measure_adapter(
    ctx: ContextSet, adapter_dir: str | Path, tau: float, base_model: Any = None
) -> tuple[float, float]:
    """Exact float64 (KL(π_ref‖π_θ), KL(π_θ‖π_ref)) of a plain LoRA adapter (no DoRA, one r and α) in
    `adapter_dir`, mean over the context rows.

    Head-only adapters need no model (x_θ = x); any other adapter needs `base_model` (wrapped, then unwrapped).
    Given `base_model`, a head-only adapter also runs the forward (the tests compare the two paths).
    """
    z_ref = ctx.x @ ctx.w0.T / tau  # (N, V)
    dw = head_delta(adapter_dir)
    if is_head_only(adapter_dir) and base_model is None:
        return kl_pair64(z_ref, ctx.x @ (ctx.w0 + dw).T / tau)
    if base_model is None:
        raise ValueError(
            f"{adapter_dir} adapts more than lm_head: pass base_model to run the adapted forward"
        )
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    try:
        model.eval()
        with torch.no_grad():
            x = lm_head_inputs(model, ctx.input_ids, ctx.attention_mask)[ctx.rows].double().numpy()
    finally:
        model.unload()  # restores base_model's modules without the LoRA layers
    w = ctx.w0 if dw is None else ctx.w0 + dw
    return kl_pair64(z_ref, x @ w.T / tau)
