"""Rollout engines: a separate copy of the policy that samples completions, as an inference server would.

In deployed RL the rollouts come from an inference engine (vLLM, SGLang; bf16 or fp8 kernels) and the gradients
from the trainer, and the two disagree on token probabilities: the train–inference discrepancy of arXiv
2606.08779 (notes: /work/shared/research/papers.md §3). These engines reproduce that setting on CPU with a
controlled, named source of disagreement:

| kind    | engine model                                   | what differs from the trainer's forward            |
|---------|------------------------------------------------|----------------------------------------------------|
| `same`  | none (the trainer samples with its own model)  | nothing: today's behaviour                         |
| `fp32`  | plain fp32 copy, LoRA merged into the weights  | rounding only (merged W x vs W0 x + s B A x, KV    |
|         |                                                | cache vs full forward): the natural floor          |
| `bf16`  | the same copy in bfloat16                      | bf16 weights and activations                       |
| `int8`  | fp32 copy, every Linear (and the head)         | int8 weights (per output channel), activations     |
|         | dynamically quantised to int8                  | quantised per tensor at run time: the CPU analogue |
|         |                                                | of an fp8 deployment                               |
| `noise` | fp32 copy, weight matrices ⊙ (1 + σ ε)         | a seeded weight perturbation of relative size σ,   |
|         |                                                | redrawn at every sync                              |

Notation:
    B      sequences in a generation batch (prompts × completions); P padded prompt length; T generated length;
           V vocabulary size
    W0     frozen base weight of a LoRA layer; A (r, in), B (out, r); s = peft's `scaling` (alpha / r, ...)
    W      merged weight W0 + Σ_a s_a B_a A_a over the active adapters (LoRA, Hu et al. 2021, eq. 3:
           h = W0 x + B A x; peft `LoraLayer.get_delta_weight`, transposed for GPT-2's Conv1D)
    τ      sampling temperature; p_t the distribution the engine samples token t from: softmax of the
           processed scores z_t / τ with the top-k / top-p tokens kept (HF `generate` logits warpers)
    σ, ε   relative weight-noise scale and ε ~ N(0, 1) elementwise
    δ_t    |π_train(y_t) − π_engine(y_t)|, the token discrepancy of arXiv 2606.08779 (secondary summary)

Design:
- The engine copies the model once at construction (a deep copy of the transformers model, every peft
  `LoraLayer` replaced by its base layer, the output layer untied from the input embedding so a merged or
  perturbed head never changes the embedding), then `sync` writes only what can change: the merged W of every
  LoRA layer and any parameter the trainer trains; the `noise` engine also redraws ε for every weight matrix.
- Nothing here touches the global torch RNG except `generate` without a seed (HF sampling draws from it, exactly
  as the trainer's own `generate` does): construction and `sync` use their own generators.
- `int8` uses `torch.ao.nn.quantized.dynamic.Linear`, built module by module so a sync re-quantises only the
  layers whose weights changed; the result is bit-identical to `torch.ao.quantization.quantize_dynamic` with
  `per_channel_dynamic_qconfig` applied to the fp32 engine (tested), lm_head included. On x86 / fbgemm the
  activations are quantised to 7 bits (the kernel's `reduce_range=True`). torch marks `torch.ao.quantization`
  deprecated in favour of torchao, but 2.13 still ships and runs it (torchao would be a new dependency); its
  warnings are silenced here and `check_engine` fails with the fix if a later torch drops it.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GenerationConfig
from transformers.pytorch_utils import Conv1D

from arca_lab.models import lm_head_of, no_dropout

ENGINES: tuple[str, ...] = ("same", "fp32", "bf16", "int8", "noise")
"""Rollout engine kinds; "same" means the trainer samples with its own model (no engine)."""
INT8_BACKENDS: tuple[str, ...] = ("fbgemm", "x86", "qnnpack")
"""torch quantized CPU backends that run dynamic int8 Linear layers."""


# ------------------------------------------------------------------------------------------------- checks
def check_engine(kind: str, noise: float = 0.0) -> None:
    """Raise ValueError naming the fix if (`kind`, `noise`) cannot run here; cheap, needs no model."""
    if kind not in ENGINES:
        raise ValueError(f"rollout engine {kind!r} is unknown: choose one of {ENGINES}")
    if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
        raise ValueError(
            f"noise={noise!r} is not valid: use a relative weight-noise scale sigma >= 0 (e.g. 0.01)"
        )
    if noise > 0 and kind != "noise":
        raise ValueError(
            f"noise={noise} only applies to engine='noise', not engine={kind!r}: "
            "set engine='noise', or leave noise at 0"
        )
    if kind == "noise" and noise == 0:
        raise ValueError(
            "engine='noise' needs noise > 0 (relative weight-noise scale sigma, e.g. 0.01); "
            "an unperturbed copy is engine='fp32'"
        )
    if kind == "int8":
        _check_int8()


def _check_int8() -> None:
    supported = list(torch.backends.quantized.supported_engines)
    usable = [b for b in INT8_BACKENDS if b in supported]
    if not usable:
        raise ValueError(
            f"engine='int8' needs a quantized CPU backend ({', '.join(INT8_BACKENDS)}) but this torch build "
            f"supports {supported}: use engine='bf16' or engine='noise', or a torch CPU build with fbgemm/x86"
        )
    if torch.backends.quantized.engine not in usable:
        raise ValueError(
            f"engine='int8': the active quantized backend is {torch.backends.quantized.engine!r}; set "
            f"torch.backends.quantized.engine = {usable[0]!r} first"
        )
    try:
        with _quiet():
            from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"engine='int8' needs torch.ao dynamic quantisation, which this torch {torch.__version__} lacks "
            f"({e}): use engine='bf16' or engine='noise', or torch 2.13"
        ) from None


def make_engine(kind: str, policy: nn.Module, *, noise: float = 0.0, seed: int = 0) -> RolloutEngine | None:
    """The rollout engine `kind` for `policy` (a peft model or a plain causal LM), synced to its current weights;
    None for "same" (the trainer samples itself). Arguments are checked before the model is touched."""
    check_engine(kind, noise)
    if kind == "same":
        return None
    return RolloutEngine(kind, policy, noise=noise, seed=seed)


# ------------------------------------------------------------------------------------------------- engine
class RolloutEngine:
    """A separate sampling copy of the policy (see the module docstring for the kinds).

    Attributes: `model` (the engine's transformers model, eval mode, no grad), `kind`, `noise`, `seed`,
    `syncs` (completed syncs, construction included), `sync_seconds` / `generate_seconds` (accumulated wall time),
    `last_entropies` (per-token entropy of p_t for the completions of the last `generate`, nats).
    """

    def __init__(self, kind: str, policy: nn.Module, *, noise: float = 0.0, seed: int = 0):
        check_engine(kind, noise)
        if kind == "same":
            raise ValueError("engine='same' has no engine object: use make_engine, which returns None for it")
        base = _base_model(policy)
        device = next(base.parameters()).device
        if kind == "int8" and device.type != "cpu":
            raise ValueError(f"engine='int8' runs on CPU only, the policy is on {device}: use engine='bf16'")
        _check_plain_lora(base)
        self.kind, self.noise, self.seed = kind, float(noise), seed
        self.syncs = 0
        self.sync_seconds = 0.0
        self.generate_seconds = 0.0
        self.last_entropies: list[list[float]] = []
        start = time.perf_counter()
        self.model = self._copy(base)
        if kind == "bf16":
            self.model.to(torch.bfloat16)
        modules = dict(self.model.named_modules())
        # Weight matrices: what noise perturbs and int8 quantises (Linear, GPT-2's Conv1D and the head); norms,
        # embeddings and biases stay exact (a deployment keeps them in high precision too).
        self._matrices = [n for n, m in modules.items() if isinstance(m, nn.Linear | Conv1D)]
        self._conv1d = {n for n in self._matrices if isinstance(modules[n], Conv1D)}  # weight is (in, out)
        sources = dict(base.named_modules())
        # What the trainer can change: LoRA layers (merged W) and modules with trainable parameters of their own.
        self._changing = [
            n
            for n in modules
            if n in sources
            and (
                isinstance(sources[n], LoraLayer)
                or any(p.requires_grad for p in sources[n].parameters(recurse=False))
            )
        ]
        with torch.no_grad():
            self._write_all(base, names=list(dict.fromkeys([*self._matrices, *self._changing])))
        self.sync_seconds += time.perf_counter() - start

    def __repr__(self) -> str:
        sigma = f", noise={self.noise}" if self.kind == "noise" else ""
        return f"RolloutEngine(kind={self.kind!r}{sigma}, seed={self.seed}, syncs={self.syncs})"

    # --- weights -----------------------------------------------------------------------------------------
    def _copy(self, base: nn.Module) -> nn.Module:
        """Plain fp32 transformers copy of `base`: LoRA layers unwrapped, head untied, eval, no grad."""
        lora_names = [n for n, m in base.named_modules() if isinstance(m, LoraLayer)]
        with torch.no_grad():
            model = copy.deepcopy(base)
        # TRL's GRPOTrainer patches the policy's `forward` on the instance (`add_fused_lm_head`) with a closure over
        # the ORIGINAL model's forward; a deep copy keeps that closure, so the copy would run the trainer's own
        # weights. Drop the instance attribute: the copy runs its class's forward on its own weights.
        model.__dict__.pop("forward", None)
        for name in lora_names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, getattr(owner, child).get_base_layer())
        model.float().requires_grad_(False).eval()
        for p in model.parameters():
            p.grad = None
        head = lm_head_of(model)
        if any(head.weight is p for p in model.get_input_embeddings().parameters()):
            # The copy's head gets its own storage: a merged head LoRA or head noise must not reach the embedding.
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
        # Sampling is set entirely by `generate`'s arguments: no top_k / min_p / penalties from the checkpoint.
        model.generation_config = GenerationConfig()
        return model

    def sync(self, policy: nn.Module) -> None:
        """Copy the trainer's current weights (LoRA merged), then re-quantise (int8) or re-perturb (noise)."""
        start = time.perf_counter()
        names = (
            self._changing
            if self.kind != "noise"
            else list(dict.fromkeys([*self._matrices, *self._changing]))
        )
        with torch.no_grad():
            self._write_all(_base_model(policy), names)
        self.sync_seconds += time.perf_counter() - start

    def _write_all(self, base: nn.Module, names: list[str]) -> None:
        sources = dict(base.named_modules())
        missing = [n for n in names if n not in sources]
        if missing:
            raise ValueError(
                f"sync: the policy has no modules {missing[:3]}: pass the policy the engine was built from, "
                "unwrapped (accelerator.unwrap_model(trainer.model))"
            )
        gen = None
        if self.kind == "noise":
            # ε is seeded by (seed, sync count): reruns draw the same perturbations, each sync fresh ones.
            state = np.random.SeedSequence([self.seed, self.syncs]).generate_state(1, dtype=np.uint64)[0]
            gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(int(state))
        for name in names:
            self._write(name, sources[name], gen)
        self.syncs += 1

    def _write(self, name: str, source: nn.Module, gen: torch.Generator | None) -> None:
        own = source.get_base_layer() if isinstance(source, LoraLayer) else source
        params = dict(own.named_parameters(recurse=False))
        weight = merged_weight(source) if "weight" in params else None  # fp32, the source's layout
        if name in self._matrices and weight is not None:
            if self.kind == "noise":
                # W ← W ⊙ (1 + σ ε), ε ~ N(0, 1) elementwise: relative weight noise (see module docstring).
                eps = torch.randn(weight.shape, generator=gen, device=weight.device, dtype=weight.dtype)
                weight = weight * (1 + self.noise * eps)
            if self.kind == "int8":
                w = weight.t() if name in self._conv1d else weight  # (out, in)
                bias = params.get("bias")
                bias = None if bias is None else bias.detach().float()
                current = self.model.get_submodule(name)
                if isinstance(current, nn.Linear | Conv1D):  # first write: swap in the quantised module
                    self._set_module(name, _int8_linear(w, bias))
                else:  # later syncs: re-quantise in place
                    current.set_weight_bias(_int8_weight(w), bias)
                return
        target = self.model.get_submodule(name)
        for pname, p in params.items():
            value = weight if pname == "weight" else p.detach()
            getattr(target, pname).copy_(value)  # copy_ casts to the engine dtype (bf16)

    def _set_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    # --- sampling ----------------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        pad_token_id: int,
        eos_token_ids: int | list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one completion per prompt with the engine model; see `sample` (entropies: `last_entropies`)."""
        start = time.perf_counter()
        completions, logprobs, self.last_entropies = sample(
            self.model,
            prompt_ids,
            pad_token_id=pad_token_id,
            eos_token_ids=eos_token_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )
        self.generate_seconds += time.perf_counter() - start
        return completions, logprobs


# ------------------------------------------------------------------------------------------------ helpers
def merged_weight(layer: nn.Module) -> torch.Tensor:
    """The weight `layer` applies in its forward, float32, in its base layer's layout: W0 + Σ s B A over the
    active, unmerged adapters of a peft `LoraLayer` (W0 − Σ over merged ones while adapters are disabled);
    a plain layer's own weight otherwise."""
    if not isinstance(layer, LoraLayer):
        return layer.weight.detach().float()
    w = layer.get_base_layer().weight.detach().float()
    merged = [a for a in layer.merged_adapters if a in layer.lora_A]
    if layer.disable_adapters:  # peft's forward unmerges first, then runs the base layer alone
        deltas = [layer.get_delta_weight(a) for a in merged]
        return w - sum(d.detach().float() for d in deltas) if deltas else w
    active = [a for a in layer.active_adapters if a in layer.lora_A and a not in merged]
    for a in active:
        w = w + layer.get_delta_weight(a).detach().float()
    return w


def sample(
    model: nn.Module,
    prompt_ids: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_ids: int | list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    seed: int | None = None,
) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
    """Left-pad `prompt_ids`, sample one completion each with HF `generate` (temperature, then top-k, then
    top-p; nothing else), and return per row: the completion truncated after its first EOS (inclusive, as
    TRL's `_generate_single_turn`), log p_t(y_t) of every sampled token and the entropy H(p_t), both float32
    from the processed scores (`output_scores=True`) — the distribution that was actually sampled.

    `seed` given: sampling draws from a forked RNG seeded with it, and the global RNG is left as it was;
    None: the global RNG, as the trainer's own `generate` would use it. Dropout is off during the call (every
    submodule in eval mode, training flags restored afterwards), as in the trainer's sampling.
    """
    _check_sampling(prompt_ids, max_new_tokens, temperature, top_p, top_k)
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    device = next(model.parameters()).device
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_token_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,  # 0 disables it; None would let HF fill in its default of 50
        repetition_penalty=1.0,
        pad_token_id=pad_token_id,
        eos_token_id=eos,
        output_scores=True,
        return_dict_in_generate=True,
        disable_compile=True,
    )
    rng = _forked_rng(device, seed) if seed is not None else nullcontext()
    with rng, torch.no_grad(), no_dropout(model):
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
    tokens = out.sequences[:, P:].cpu()  # (B, T)
    logps, ents = [], []
    for t, z in enumerate(out.scores):  # z: (B, V) processed scores of step t, -inf outside top-k / top-p
        logp = torch.log_softmax(z.float(), dim=-1).cpu()  # (B, V)
        logps.append(logp.gather(1, tokens[:, t : t + 1]).squeeze(1))  # (B,)
        p = logp.exp()
        ents.append(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))  # (B,) 0 log 0 = 0
    logp_t = torch.stack(logps, 1)  # (B, T)
    ent_t = torch.stack(ents, 1)  # (B, T)
    lengths = _lengths_through_eos(tokens, eos)  # (B,)
    return (
        [tokens[i, : int(n)].tolist() for i, n in enumerate(lengths)],
        [logp_t[i, : int(n)].tolist() for i, n in enumerate(lengths)],
        [ent_t[i, : int(n)].tolist() for i, n in enumerate(lengths)],
    )


def completion_logprobs(
    model: nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
) -> list[list[float]]:
    """Teacher-forced log softmax(z_t / τ)(y_t) of given completions under `model` (one no-grad forward of the
    left-padded prompt + right-padded completion), float32. Position ids count from each row's first real
    token, as HF `generate` assigns them (TRL's loss forward passes none: a left-padding offset, harmless for
    RoPE models, shifts absolute-position models such as GPT-2). Dropout is off, as in `sample`."""
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    T = max(1, max(len(c) for c in completion_ids))
    ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)  # (B, P + T)
    mask = torch.zeros((B, P + T), dtype=torch.long)  # (B, P + T)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        row = torch.tensor([*p, *c], dtype=torch.long)
        ids[i, P - len(p) : P + len(c)] = row
        mask[i, P - len(p) : P + len(c)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P + T)
    device = next(model.parameters()).device
    with torch.no_grad(), no_dropout(model):
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
        ).logits  # (B, P + T, V)
    logp = torch.log_softmax(logits[:, P - 1 : P + T - 1].float().cpu() / temperature, dim=-1)  # (B, T, V)
    got = logp.gather(2, ids[:, P:, None]).squeeze(2)  # (B, T)
    return [got[i, : len(c)].tolist() for i, c in enumerate(completion_ids)]


def _lengths_through_eos(tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """(B,) tokens kept per row: up to and including the first EOS, all T when there is none."""
    is_eos = torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype))  # (B, T)
    T = tokens.size(1)
    return torch.where(
        is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], T, dtype=torch.long)
    )


def _check_sampling(
    prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, top_k: int
) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not valid: use >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} is not valid: use a temperature > 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is not valid: use 0 < top_p <= 1")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is not valid: use 0 (off) or k >= 1")


@contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _base_model(policy: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers injected in place), or `policy` itself."""
    get = getattr(policy, "get_base_model", None)
    return get() if callable(get) else policy


def _check_plain_lora(base: nn.Module) -> None:
    """Engines merge s B A: LoRA variants (DoRA, ...) and LoRA biases change the layer differently."""
    for name, m in base.named_modules():
        if isinstance(m, LoraLayer):
            odd = [a for a in m.lora_A if a in m.lora_variant or m.lora_bias.get(a, False)]
            if odd:
                raise ValueError(
                    f"{name}: adapter(s) {odd} use a LoRA variant (DoRA, ...) or lora_bias, which rollout engines "
                    "do not merge: use plain LoRA (use_dora=False, lora_bias=False) or engine='same'"
                )
        elif type(m).__name__ == "ModulesToSaveWrapper":
            raise ValueError(
                f"{name}: peft modules_to_save copies are not supported by rollout engines: "
                "drop modules_to_save or use engine='same'"
            )


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Dynamic int8 Linear (the module `quantize_dynamic` installs) for weight (out, in): the weight quantised
    by `_int8_weight`, activations quantised per tensor at run time."""
    with _quiet():
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        module = DynamicQuantizedLinear(
            weight.size(1), weight.size(0), bias_=bias is not None, dtype=torch.qint8
        )
        module.set_weight_bias(_int8_weight(weight), bias)
        return module


def _int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Weight (out, in) quantised to qint8, symmetric per output channel, with the qparams of torch's
    `per_channel_dynamic_qconfig` observer (`PerChannelMinMaxObserver`, per_channel_symmetric;
    torch/ao/quantization/observer.py): scale_o = max_i |W_oi| / ((127 − (−128)) / 2), floored at float32 eps,
    zero point 0. Computed here because the observer's `torch.aminmax` took ~15 ms per matrix with 2 threads
    on a busy machine (amin / amax: 0.02 ms); the result is bit-identical (tested)."""
    w = weight.detach().float().contiguous()  # (out, in)
    amax = torch.maximum(-w.amin(1).clamp(max=0), w.amax(1).clamp(min=0))  # (out,)
    scale = (amax / 127.5).clamp(min=torch.finfo(torch.float32).eps)  # (out,)
    zero = torch.zeros_like(scale, dtype=torch.long)  # (out,)
    with _quiet():
        return torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization's deprecation notices, once per call otherwise (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantize_per_.*")
        yield
