"""Input schema of the a-priori KL bound for single-layer LoRA GRPO (derivation: ``theory/apriori.md``).

One frozen dataclass, :class:`BoundInputs`, holds everything the a-priori bound may use: hyper-parameters
and the input radius R. It holds no measured gradient norm. The lab fills it from a run's recorded values;
``__post_init__`` rejects values outside the bound's assumptions with a ``ValueError`` that names the accepted
values.

Notation (theory/apriori.md §0):
    V            number of actions / vocabulary rows of the adapted layer (W ∈ R^{V×d})
    d            input dimension (peft's ``in_features``, the fan-in of lora_A)
    r            LoRA rank; B ∈ R^{V×r}, A ∈ R^{r×d}, B₀ = 0
    s(r)         LoRA scaling: alpha/r ("alpha/r", peft default), alpha/√r ("rslora"), alpha ("const")
    τ            sampling temperature; TRL divides logits by τ, so the policy is softmax(W x / τ)
    R            input radius, ‖x‖₂ ≤ R
    ‖A₀‖₂        spectral norm of lora_A at initialisation
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALINGS: tuple[str, ...] = ("alpha/r", "rslora", "const")
# Canonical optimiser names; HF Trainer's ``optim`` strings for torch AdamW map onto "adamw".
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
OPTIMIZER_ALIASES: dict[str, str] = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw"}
# HF ``lr_scheduler_type`` names (transformers.optimization); "constant" ignores warm-up, as HF does.
SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine")


def _accepted(name: str, accepted: tuple[str, ...]) -> str:
    return f"{name} must be one of {', '.join(repr(a) for a in accepted)}"


@dataclass(frozen=True)
class BoundInputs:
    """Hyper-parameters of one single-layer LoRA run (policy softmax((W₀ + s·B A) x / τ)).

    A₀ enters through exactly one deterministic quantity (theory/apriori.md §2):
      * ``a0_norm`` given: the realised spectral norm ‖A₀‖₂ (largest singular value of lora_A at init);
      * else ``a0_delta`` given: a bound on ‖A₀‖₂ that holds with probability ≥ 1 − a0_delta over peft's
        Kaiming-uniform init (entries iid U[−1/√d, 1/√d]);
      * else: the worst case of peft's init, ‖A₀‖₂ ≤ ‖A₀‖_F ≤ √r (every entry ≤ 1/√d in absolute value).

    ``steps`` counts optimiser steps; ``warmup`` is in optimiser steps (HF ``num_warmup_steps``).
    ``grad_clip`` is the max global gradient norm of this layer's adapter parameters (A, B) — required for
    "sgd"; ignored by Adam, whose step size does not depend on the gradient scale.
    ``weight_decay`` may be any λ ≥ 0 with lr·λ ≤ 1 (decay then only shrinks parameters; the bound
    ignores it).
    """

    vocab_size: int
    in_features: int
    rank: int
    alpha: float
    lr: float
    steps: int
    input_radius: float
    scaling: str = "alpha/r"
    optimizer: str = "adamw"
    schedule: str = "constant"
    warmup: int = 0
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    temperature: float = 1.0
    a0_norm: float | None = None
    a0_delta: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int | float) or int(self.vocab_size) != self.vocab_size:
            raise ValueError(f"vocab_size must be an integer >= 2, got {self.vocab_size!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {self.vocab_size!r}")
        if int(self.in_features) != self.in_features or self.in_features < 1:
            raise ValueError(f"in_features must be an integer >= 1, got {self.in_features!r}")
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha (lora_alpha) must be > 0, got {self.alpha!r}")
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0 (optimiser steps), got {self.steps!r}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0 (optimiser steps), got {self.warmup!r}")
        if not self.input_radius >= 0:
            raise ValueError(f"input_radius R must be >= 0, got {self.input_radius!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"{_accepted('scaling', SCALINGS)}; got {self.scaling!r}")
        opt = OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        if opt not in OPTIMIZERS:
            names = OPTIMIZERS + tuple(OPTIMIZER_ALIASES)
            raise ValueError(f"{_accepted('optimizer', names)}; got {self.optimizer!r}")
        object.__setattr__(self, "optimizer", opt)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{_accepted('schedule', SCHEDULES)}; got {self.schedule!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if opt == "sgd" and self.grad_clip is None:
            raise ValueError(
                "optimizer 'sgd' needs grad_clip (max global grad norm) for an a-priori bound; "
                "set grad_clip > 0 or use optimizer 'adam'/'adamw'"
            )
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        b1, b2 = (float(b) for b in self.betas)
        if not (0 <= b1 < 1 and 0 < b2 < 1):
            raise ValueError(f"betas must satisfy 0 <= beta1 < 1 and 0 < beta2 < 1, got {self.betas!r}")
        if not b1 * b1 < b2:
            raise ValueError(
                f"betas must satisfy beta1**2 < beta2 (the Adam step lemma needs it), got {self.betas!r}"
            )
        object.__setattr__(self, "betas", (b1, b2))
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.lr * self.weight_decay > 1:
            raise ValueError(
                f"lr * weight_decay must be <= 1 (decay factor 1 - lr*wd in [0, 1]), got "
                f"{self.lr} * {self.weight_decay}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.a0_norm is not None and not (self.a0_norm >= 0 and math.isfinite(self.a0_norm)):
            raise ValueError(
                f"a0_norm (realised spectral norm of lora_A at init) must be >= 0, got {self.a0_norm!r}"
            )
        if self.a0_delta is not None and not 0 < self.a0_delta < 1:
            raise ValueError(f"a0_delta (failure probability) must be in (0, 1), got {self.a0_delta!r}")

    @property
    def a0_mode(self) -> str:
        """How A₀ enters: "realised", "high_probability" or "worst_case"."""
        if self.a0_norm is not None:
            return "realised"
        return "high_probability" if self.a0_delta is not None else "worst_case"
