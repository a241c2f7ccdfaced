"""Loading the policy (any HF causal LM or the embedded default) and building its LoRA config.

Nothing here is architecture-specific: the output layer is found with `get_output_embeddings()` and the backbone
with `base_model_prefix`, so any causal LM that peft supports works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from arca_lab.config import RunConfig


def resolve_device_dtype(cfg: RunConfig) -> tuple[torch.device, torch.dtype]:
    """cuda + bf16 when a GPU is there (as the ARCA paper ran), else cpu + fp32 (bf16 matmuls are slow on CPU)."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no GPU is visible: use --device cpu (or auto)")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return torch.device(device), getattr(torch, dtype)


def resolve_model_path(model: str) -> str:
    """ "embedded" -> the cached tiny model directory (built on first use); a named packaged model
    (`arca_lab.pretrained.NAMED_MODELS`) -> its converted directory; a local path must exist."""
    if model == "embedded":
        from arca_lab.embedded import embedded_model_dir

        return str(embedded_model_dir())
    from arca_lab.pretrained import NAMED_MODELS, named_model_dir

    if model in NAMED_MODELS:  # a packaged pretrained model, converted to the hub format once
        return str(named_model_dir(model))
    looks_local = model.startswith((".", "/", "~")) or (os.sep in model and not _looks_like_hub_id(model))
    if looks_local and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(
            f"model directory {model!r} does not exist: pass an existing directory saved with save_pretrained, "
            'an HF hub id such as "Qwen/Qwen3-1.7B-Base", or "embedded"'
        )
    return str(Path(model).expanduser()) if looks_local else model


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def load_policy(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in the run's dtype on its device, and a tokenizer that left-pads (generation) and has a pad token."""
    path = resolve_model_path(cfg.model)
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def lm_head_of(model: nn.Module) -> nn.Module:
    """The output layer (hidden state -> vocabulary logits) as the model reports it, never found by name."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__}.get_output_embeddings() returned None: load the model with "
            "AutoModelForCausalLM (a bare AutoModel has no output layer)"
        )
    return head


def lm_head_module_name(model: nn.Module) -> str:
    """Dotted name of `lm_head_of(model)` inside `model` (e.g. "lm_head", "cls.predictions.decoder"; under
    peft "base_model.model.lm_head"), found by identity; usable as a peft ``target_modules`` entry."""
    head = lm_head_of(model)
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError(f"the output layer of {type(model).__name__} is not a submodule of it")


def base_head(model: nn.Module) -> nn.Module:
    """The frozen output layer: the LoRA layer's `base_layer` when lm_head is adapted, else lm_head itself."""
    head = lm_head_of(model)
    return getattr(head, "base_layer", head)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body whose output (after the final norm) is the input of lm_head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def final_norm(model: nn.Module) -> nn.Module | None:
    """The last RMSNorm-like module of the backbone (class name contains "RMSNorm"), or None.

    Whether its output really is the input of lm_head is checked on every forward by
    `arca_lab.analysis.heldout_kl.measure_tokens`.
    """
    found = None
    for module in backbone_of(model).modules():
        if "rmsnorm" in type(module).__name__.lower():
            found = module
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the ModuleList in the backbone with num_hidden_layers entries."""
    backbone = backbone_of(model)
    n = backbone.config.get_text_config().num_hidden_layers
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} decoder layers of {type(backbone).__name__}")


def lora_config(cfg: RunConfig, model: nn.Module) -> LoraConfig:
    """peft LoraConfig for the run; the scaling rule becomes peft's alpha/r, rsLoRA's alpha/sqrt(r), or alpha*r/r."""
    names = [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    if not names:
        raise ValueError(
            "target_modules is empty: use all-linear, lm_head, or module names like q_proj,v_proj"
        )
    if names == ["all-linear"]:
        targets: str | list[str] = "all-linear"
    else:
        head_name = lm_head_module_name(model)
        targets = [head_name if n == "lm_head" else n for n in names]
        present = {name.split(".")[-1] for name, _ in model.named_modules()} | {head_name}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ValueError(f"target_modules {missing} are not modules of {type(model).__name__}")
    alpha = cfg.lora_alpha()
    return LoraConfig(
        r=cfg.rank,
        # "const" keeps s = alpha for every rank: peft computes alpha'/r, so alpha' = alpha * r.
        lora_alpha=alpha * cfg.rank if cfg.scaling == "const" else alpha,
        use_rslora=cfg.scaling == "rslora",
        target_modules=targets,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) the model applies after its output layer: logits =
    cap · tanh(scale · z / cap) (no tanh when cap is None), z = lm_head(h).

    Read from the config exactly as TRL 1.16's fused head reads it (`trl.trainer.utils.add_fused_lm_head`), so
    the credit and probe path scores the distribution the loss trains: Gemma's `final_logit_softcapping`,
    `logit_scale` / `output_multiplier` / `lm_head_multiplier` multipliers, Granite's `logits_scaling` divisor
    (a multiplier for HyperCLOVA X). The first-batch self-check in the trainer verifies the result against
    `model(...).logits`.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config()
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if cap is None else float(cap))


def head_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transform: tuple[float, float | None] = (1.0, None),
) -> torch.Tensor:
    """Output-layer logits in float32 whatever the model dtype: transform(h W^T + b), (..., d) -> (..., V).

    `weight` (V, d) should already be float32 (cast it once); `transform` from `logit_transform`.
    """
    z = torch.nn.functional.linear(h.float(), weight.float(), None if bias is None else bias.float())
    scale, cap = transform
    if scale != 1.0:
        z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return z


def dropout_sources(model: nn.Module) -> list[str]:
    """Where the model drops out in train mode: `nn.Dropout` modules with p > 0 (LoRA dropout included) and a
    config `attention_dropout` > 0 (Llama-family attention applies it functionally, not as a module)."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    attn = getattr(cfg.get_text_config(), "attention_dropout", 0.0) if cfg is not None else 0.0
    if isinstance(attn, int | float) and attn > 0:
        found.append(f"config.attention_dropout={attn}")
    return found


@contextmanager
def no_dropout(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the call (all dropout off: nn.Dropout and the functional attention dropout
    HF attention applies when its module is training), the flags restored afterwards. The root keeps its flag:
    TRL routes its metrics by `model.training`, and no computation reads the root's flag."""
    switched = [m for m in model.modules() if m is not model and m.training]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True
