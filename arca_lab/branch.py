"""Credit `arca_branch`: ARCA's residual estimated from the LoRA branches that write into the residual stream.

Exact ARCA (ARCA paper, arXiv 2606.00257, definition of the ARCA score) is α_t = ‖h_t^adapted − h_t^base‖₂
with h the input of lm_head, i.e. the output N(u) of the final norm, and base = adapter disabled. Without a
base forward, this module estimates it from the loss forward alone (theory/arca_branch.md §1–§2):

    α̂_t = ‖J_N(u_t) D_t‖₂,   D_t = Σ_{w ∈ LoRA writers} s_w B_w A_w x_{w,t},
    J_N(u) v = g ⊙ (v − n (nᵀv)/d) / σ(u),   σ(u) = sqrt(‖u‖²/d + ε),   n = u / σ(u)   (RMSNorm; LayerNorm
    centres u and v first).

D is the vector sum of the branch outputs of the modules whose output is added into the residual stream
(Llama / Qwen3: o_proj, down_proj; GPT-2: attn.c_proj, mlp.c_proj): the *direct path* of the adapter's change
of u. Neglected (both first order in the adapter scale, theory/arca_branch.md §1): the non-writer branches
(q/k/v/gate/up) and the propagation of every write through the later blocks. α̂ equals exact ARCA to first
order only when the sole adapted module is the last block's last writer; benchmarks/bench_branch.py measures
how it ranks tokens otherwise (Spearman ρ ≈ 0.3 on a trained all-linear adapter).

Usage (one forward, e.g. the trainer's loss forward):

    writers = find_residual_writers(policy)              # once: one tiny probe forward
    with branch_capture(policy, writers) as store:
        policy(input_ids=ids, attention_mask=mask)       # ids (B, P + T)
        scores = first_order_residual(store, T)          # (B, T), positions predicting the completion tokens

Notation:
    B: rows; S = P + T: prompt + completion positions; T: completion positions; d: hidden size
    writers: modules whose output enters the residual stream unchanged (found structurally, see
        `find_residual_writers`)
    u: (B, S, d) residual stream entering the final norm N (adapted forward)
    D: (B, S, d) Σ over LoRA writers of s·B A x, float32
    g, ε: the final norm's gain and epsilon; centred: LayerNorm (subtracts the mean) vs RMSNorm
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from arca_lab.models import backbone_of, decoder_layers

_PROBE_SHAPE = (2, 8)  # (rows, tokens) of the probe forward: enough equations (2 · 8 · d) for the fits below
_COEF_TOL = 0.05  # a fitted coefficient within this of 1 is a writer, within this of 0 is not


@dataclass(frozen=True)
class ResidualWriters:
    """What `find_residual_writers` verified on its probe forward."""

    names: tuple[str, ...]
    """Dotted names (inside the backbone) of every module writing into the residual stream, adapted or not."""
    lora: tuple[LoraLayer, ...]
    """The writers that carry LoRA: their branch outputs sum to D."""
    norm: nn.Module
    """The final norm N: its input is u, its output the input of lm_head."""
    centered: bool
    """True for LayerNorm (subtracts the mean), False for RMSNorm."""
    eps: float
    backbone: nn.Module


@dataclass
class BranchStore:
    """Filled by `branch_capture` during a forward; read by `first_order_residual`."""

    writers: ResidualWriters
    D: torch.Tensor | None = None
    """(B, S, d) float32 sum of the LoRA writers' branch outputs; None if no branch ran (adapter disabled)."""
    u: torch.Tensor | None = None
    """(B, S, d) input of the final norm, detached (a reference to the forward's own tensor, not a copy)."""


def _tolerance(dtype: torch.dtype) -> float:
    """Relative error accepted by the structural checks (fp32 rounding vs bf16/fp16 rounding)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def _first(output: Any) -> Any:
    if isinstance(output, tuple | list):
        return output[0]
    return getattr(output, "last_hidden_state", output)


def _linear_leaves(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules computing one linear map each: LoRA layers as a whole, and leaves with a matrix weight."""
    found: list[tuple[str, nn.Module]] = []
    lora_prefixes: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue  # base_layer, lora_A, lora_B of a LoRA layer already listed
        if isinstance(module, LoraLayer):
            found.append((name, module))
            lora_prefixes.append(name + ".")
        elif next(module.children(), None) is None and any(p.dim() == 2 for p in module.parameters(False)):
            found.append((name, module))
    return found


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _normalize(u: torch.Tensor, eps: float, centered: bool) -> torch.Tensor:
    """(u − mean(u) if centred) / σ, the gain-free norm (theory/arca_branch.md §2)."""
    x = u - u.mean(-1, keepdim=True) if centered else u
    return x / (x.square().mean(-1, keepdim=True) + eps).sqrt()


def _gain(norm: nn.Module) -> torch.Tensor | None:
    w = getattr(norm, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _norm_kind(norm: nn.Module, u: torch.Tensor, h: torch.Tensor, tol: float) -> tuple[bool, float]:
    """(centred, ε) such that h = g ⊙ normalize(u) + b reproduces the final norm's output; else ValueError."""
    eps = next(
        (
            float(v)
            for a in ("variance_epsilon", "eps", "epsilon")
            if isinstance(v := getattr(norm, a, None), float)
        ),
        None,
    )
    if eps is not None:
        g, b = _gain(norm), getattr(norm, "bias", None)
        for centered in (False, True):
            pred = _normalize(u.double(), eps, centered)
            pred = pred if g is None else pred * g.double()
            pred = pred if not isinstance(b, torch.Tensor) else pred + b.double()
            if _rel_err(pred, h.double()) <= tol:
                return centered, eps
    raise ValueError(
        f"the final norm {type(norm).__name__} is neither an RMSNorm g ⊙ u / sqrt(mean(u²) + eps) nor a "
        "LayerNorm (with an eps attribute): arca_branch cannot map the residual stream through it; use "
        "credit='arca'"
    )


def _writer_coefficients(delta: torch.Tensor, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Least-squares κ with delta ≈ Σ_c κ_c outputs_c (flattened, float64), and the fit's relative error."""
    if not outputs:
        return torch.zeros(0, dtype=torch.float64), 1.0
    Y = torch.stack([o.double().reshape(-1) for o in outputs], dim=1)  # (N, k), N = rows · tokens · d
    target = delta.double().reshape(-1, 1)  # (N, 1)
    kappa = torch.linalg.lstsq(Y, target, driver="gelsd").solution[:, 0]  # (k,)
    return kappa, _rel_err(Y @ kappa, target[:, 0])


@torch.no_grad()
def find_residual_writers(policy: nn.Module) -> ResidualWriters:
    """Find, on one probe forward, the modules that write into the residual stream and the final norm.

    Structural, not by name: for every decoder layer ℓ, the difference of its output and input must be a 0/1
    combination of the outputs of its linear layers of width d, r_ℓ − r_{ℓ−1} = Σ_c κ_c y_c with κ_c ∈ {0, 1}
    (least-squares fit; the writers are κ = 1). This holds for pre-norm residual decoders (Llama, Qwen3,
    Mistral, GPT-2 in eval mode) and fails, with a ValueError, for post-norm blocks (BERT) or mixtures (MoE
    routers). The
    final norm is the module whose input is the last block's output and whose output is the backbone's output
    (the input of lm_head); it must be an RMSNorm or a LayerNorm.

    The probe runs with dropout off (every module's training flag is restored). Raises ValueError, naming the
    fix, when no writer carries LoRA.
    """
    backbone = backbone_of(policy)
    layers = list(decoder_layers(policy))
    d = backbone.config.get_text_config().hidden_size
    names_of = {id(m): n for n, m in backbone.named_modules()}
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    # Candidates for the final norm: every leaf outside the decoder layers (embeddings, norms, rotary tables).
    tail = {
        n: m
        for n, m in backbone.named_modules()
        if id(m) not in in_layers and next(m.children(), None) is None
    }
    seen: dict[str, dict[Any, torch.Tensor]] = {
        "in": {},
        "out": {},
        "leaf": {},
        "tail_in": {},
        "tail_out": {},
    }

    def keep(kind: str, key: Any, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.size(-1) == d:
            seen[kind][key] = value.detach()

    handles = []
    for i, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: keep("in", i, a[0] if a else k.get("hidden_states")), with_kwargs=True
            )
        )
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: keep("out", i, _first(o))))
        for name, leaf in _linear_leaves(layer):
            handles.append(leaf.register_forward_hook(lambda m, a, o, key=(i, name): keep("leaf", key, o)))
    for name, module in tail.items():

        def tail_hook(m: nn.Module, a: tuple, o: Any, name: str = name) -> None:
            keep("tail_in", name, a[0] if a else None)
            keep("tail_out", name, o)

        handles.append(module.register_forward_hook(tail_hook))
    modes = {m: m.training for m in policy.modules()}
    policy.eval()  # dropout off: the residual identities below are exact only without it
    device = next(backbone.parameters()).device
    vocab = backbone.get_input_embeddings().num_embeddings
    ids = (
        torch.arange(_PROBE_SHAPE[0] * _PROBE_SHAPE[1], device=device).reshape(_PROBE_SHAPE) * 7 + 3
    ) % vocab
    try:
        out = _first(
            backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        )  # (2, 8, d)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    tol = _tolerance(out.dtype)

    names, lora = [], []
    for i, layer in enumerate(layers):
        if i not in seen["in"] or i not in seen["out"]:
            raise ValueError(f"decoder layer {i} did not receive or return a hidden state of width {d}")
        leaves = [(n, m) for n, m in _linear_leaves(layer) if (i, n) in seen["leaf"]]  # width-d outputs only
        kappa, err = _writer_coefficients(
            seen["out"][i] - seen["in"][i], [seen["leaf"][(i, n)] for n, _ in leaves]
        )
        binary = bool(((kappa - 1).abs() < _COEF_TOL).logical_or(kappa.abs() < _COEF_TOL).all())
        if err > tol or not binary or not bool((kappa > 0.5).any()):
            raise ValueError(
                f"decoder layer {i} ({type(layer).__name__}) is not a pre-norm residual block: its output "
                f"minus its input is not a sum of its linear layers' outputs (fit error {err:.2g}, "
                f"coefficients {[round(float(k), 3) for k in kappa]}). arca_branch supports pre-norm "
                "residual decoders (Llama, Qwen, Mistral, GPT-2); use credit='arca'"
            )
        for (name, module), k in zip(leaves, kappa.tolist(), strict=True):
            if k > 0.5:
                names.append(f"{names_of[id(layer)]}.{name}")
                if isinstance(module, LoraLayer):
                    lora.append(module)

    last = seen["out"][len(layers) - 1]  # (2, 8, d), the residual stream after the last block
    found = [
        n
        for n in tail
        if n in seen["tail_in"]
        and n in seen["tail_out"]
        and seen["tail_in"][n].shape == last.shape
        and seen["tail_out"][n].shape == out.shape
        and _rel_err(seen["tail_in"][n], last) <= tol
        and _rel_err(seen["tail_out"][n], out) <= tol
    ]
    if not found:
        raise ValueError(
            "no module maps the last decoder layer's output to the backbone's output (the input of lm_head): "
            "arca_branch needs a final norm there; use credit='arca'"
        )
    norm = tail[found[-1]]
    centered, eps = _norm_kind(norm, seen["tail_in"][found[-1]], out, tol)

    if not lora:
        adapted = sorted({n.split(".")[-1] for n, m in backbone.named_modules() if isinstance(m, LoraLayer)})
        short = sorted({n.split(".")[-1] for n in names})
        raise ValueError(
            "credit='arca_branch' reads the LoRA branches of the modules that write into the residual "
            f"stream ({', '.join(short)}), but none of them carries LoRA (adapted in the backbone: "
            f"{', '.join(adapted) or 'none'}): add {','.join(short)} to target_modules (or use all-linear), "
            "or use credit='arca'"
        )
    variants = [type(v).__name__ for m in lora for v in getattr(m, "lora_variant", {}).values()]
    if variants:
        raise ValueError(
            f"LoRA variants {sorted(set(variants))} (e.g. DoRA) do not add s·B A x into the residual stream: "
            "arca_branch needs plain LoRA; use credit='arca'"
        )
    return ResidualWriters(tuple(names), tuple(lora), norm, centered, eps, backbone)


@contextmanager
def branch_capture(policy: nn.Module, writers: ResidualWriters | None = None) -> Iterator[BranchStore]:
    """Forward hooks that fill a `BranchStore` with D and u during the forwards run inside the block.

    Each backbone forward starts a fresh store (read it before the next one, e.g. in a backbone output hook).
    Per forward: one in-place add of a (B, S, d) block per LoRA writer into one float32 accumulator, and a
    reference to the final norm's input; nothing else is copied. Pass `writers` (from `find_residual_writers`,
    computed once) to avoid a probe forward per call.
    """
    writers = writers if writers is not None else find_residual_writers(policy)
    store = BranchStore(writers)

    def reset(module: nn.Module, args: Any) -> None:
        store.D, store.u = None, None

    def norm_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        store.u = (args[0] if args else kwargs["hidden_states"]).detach()

    def accumulate(layer: LoraLayer, adapter: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            # lora_B's output is B A dropout(x); the layer adds it times s (peft LoraLayer.forward)
            if store.D is None:
                store.D = torch.zeros(output.shape, dtype=torch.float32, device=output.device)  # (B, S, d)
            store.D.add_(output.detach(), alpha=layer.scaling[adapter])

        return hook

    handles = [writers.backbone.register_forward_pre_hook(reset)]
    handles.append(writers.norm.register_forward_pre_hook(norm_input, with_kwargs=True))
    for layer in writers.lora:
        if layer.merged:
            raise ValueError(
                "a residual writer's adapter is merged into its weight: unmerge it for arca_branch"
            )
        # Only active adapters run their lora_B, so hooking every adapter sums exactly the active ones.
        for adapter, lora_B in layer.lora_B.items():
            handles.append(lora_B.register_forward_hook(accumulate(layer, adapter)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def norm_jvp(
    u: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None, eps: float, centered: bool
) -> torch.Tensor:
    """J_N(u) v, the final norm's Jacobian at u applied to v (theory/arca_branch.md §2). (..., d) → (..., d).

    RMSNorm N(u) = g ⊙ u / σ, σ = sqrt(‖u‖²/d + ε):  J_N(u) v = g ⊙ (v − n (nᵀv)/d) / σ,  n = u / σ.
    LayerNorm: the same with u and v centred (their mean subtracted); the bias does not enter.
    """
    u, v = u.float(), v.float()
    if centered:
        u, v = u - u.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    sigma = (u.square().mean(-1, keepdim=True) + eps).sqrt()  # (..., 1)
    n = u / sigma  # (..., d); ‖n‖² = d · ‖u‖² / (‖u‖² + d ε) ≈ d
    jv = (v - n * (n * v).mean(-1, keepdim=True)) / sigma  # removes the radial part of v, rescales by 1/σ
    return jv if gain is None else jv * gain.detach().float()


def first_order_residual(store: BranchStore, T: int) -> torch.Tensor:
    """α̂_t = ‖J_N(u_t) D_t‖₂ at the T positions predicting the completion tokens: (B, T), float32.

    Positions [:, -T-1:-1] of the (B, P + T) sequence (the state at position t gives the logits of t + 1).
    Zero when no LoRA writer ran (adapter disabled). See the module docstring for what it neglects.
    """
    if store.u is None:
        raise RuntimeError(
            "no forward ran the final norm inside branch_capture: run the backbone within the block"
        )
    u = store.u[:, -T - 1 : -1]  # (B, T, d)
    if store.D is None:
        return torch.zeros(u.shape[:2], dtype=torch.float32, device=u.device)
    D = store.D[:, -T - 1 : -1]  # (B, T, d)
    w = store.writers
    return torch.linalg.vector_norm(norm_jvp(u, D, _gain(w.norm), w.eps, w.centered), dim=-1)
