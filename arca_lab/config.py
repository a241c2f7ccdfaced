"""One run's configuration: every field has a one-line docstring, which is also its `--help` text.

Read top to bottom: model and task, adapter, token credit, GRPO, optimiser, evaluation, run bookkeeping.
`RunConfig.__post_init__` validates and says what to change. Presets (`PRESETS`) are plain field overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import math
import textwrap
from dataclasses import dataclass, fields
from typing import Any

from arca_lab.credit import CREDITS

SCALINGS = ("alpha/r", "rslora", "const")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")
HF_LR_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
"""RunConfig.lr_schedule -> HF `lr_scheduler_type` (constant honours warm-up); also theory's schedule names."""
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
LAYER_AGGREGATES = ("mean", "max", "sum", "rms")
TASK_PROMPT_LENGTHS = {"arith": 64, "math": 512, "chat_arith": 160, "gsm8k": 256}
"""RunConfig.max_prompt_length = 0 resolves to this per-task default (MATH problems run to a few hundred tokens;
chat_arith's system + user turn in SmolLM2's template is ~70; gsm8k: MERL's 256)."""
TASK_COMPLETION_LENGTHS = {"arith": 40, "math": 40, "chat_arith": 96, "gsm8k": 768}
"""RunConfig.max_completion_length = 0 resolves to this per-task default (a chat model explains before it answers;
the GPU presets set 512 for MATH; gsm8k: MERL's 768)."""


@dataclass
class RunConfig:
    # --- model and task -------------------------------------------------------------------------------
    model: str = "embedded"
    """HF causal-LM id or local directory; "embedded" builds (once, cached) the tiny Qwen3 default; "smollm2-135m" is SmolLM2-135M-Instruct from the `smollm` extra."""
    task: str = ""
    """Verifiable task: "arith" (embedded multi-step arithmetic), "math" (boxed answers, math-verify), "chat_arith" (word problems in a chat template) or "gsm8k" (answers after ####, chat template); empty means the model's (chat_arith for smollm2-135m, else arith)."""
    data: str | None = None
    """Tasks "math" and "gsm8k": a local JSONL (math: problem, solution; gsm8k: question, answer) or an HF datasets id; None = the task's default id."""
    # --- adapter ----------------------------------------------------------------------------------------
    rank: int = 8
    """LoRA rank r (> 0)."""
    alpha: str = "2r"
    """LoRA alpha: a number, or a multiple of the rank written like "2r" (ARCA paper) or "r" (MERL)."""
    scaling: str = "alpha/r"
    """Adapter scale s: "alpha/r" (peft default), "rslora" (alpha/sqrt(r)) or "const" (s = alpha for every r)."""
    target_modules: str = "all-linear"
    """Adapted modules: "all-linear", "lm_head" (head-only, found via get_output_embeddings), or a comma list."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input (the ARCA paper used 0.05); needs train_dropout; 0 if lm_head is adapted."""
    train_dropout: bool = False
    """Keep dropout (model config and lora_dropout) in the loss forward; sampling, credit and probe never drop out."""
    # --- token credit -----------------------------------------------------------------------------------
    credit: str = "uniform"
    """Token credit: uniform, surprisal, entropy_reduction, divergence, arca or arca_branch."""
    sharpening: float = 1.0
    """Power p on the scores before normalising within a completion (the ARCA paper's runs used 2)."""
    credit_eps: float = 1e-8
    """Floor eps added to every score before normalising (ARCA paper eq. normalize)."""
    arca_layers: str = "last"
    """Hidden states for arca: "last" (input of lm_head), "all" decoder layers, or comma-separated indices."""
    layer_aggregate: str = "mean"
    """How arca / arca_branch combine several layers' residual norms: mean, max, sum or rms."""
    # --- GRPO -------------------------------------------------------------------------------------------
    steps: int = 40
    """Optimiser steps."""
    prompts_per_step: int = 16
    """Prompts per optimiser step (each gets num_generations completions)."""
    num_generations: int = 8
    """Completions per prompt K (the group of the GRPO advantage)."""
    grad_accum: int = 1
    """Gradient-accumulation micro-batches per optimiser step."""
    temperature: float = 1.0
    """Sampling temperature (TRL divides the training logits by it too)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = off). Other than top_p = 1 and top_k = 0, the sampler is not π_θ, so sequence-level KL estimates are NaN."""
    repetition_penalty: float = 1.0
    """Sampling repetition penalty (1 = off; MERL used 1.05); like top-k, it makes the sampler differ from π_θ."""
    max_prompt_length: int = 0
    """Prompts longer than this many tokens are refused; 0 means the task's default (arith 64, math 512, chat_arith 160)."""
    max_completion_length: int = 0
    """Maximum new tokens per completion; 0 means the task's default (arith and math 40, chat_arith 96)."""
    beta: float = 0.0
    """KL penalty coefficient (TRL k3 on sampled tokens); 0 skips TRL's reference pass entirely."""
    loss_type: str = "grpo"
    """TRL loss aggregation; "grpo" (per-sequence mean) makes A*T*w the ARCA estimator exactly."""
    kl_probe: bool = True
    """Log exact full-vocabulary KL to the base model (both directions) on the sampled completions."""
    kl_probe_every: int = 0
    """If only the probe needs the base model, probe every k-th completion (0: one per prompt; 1: all)."""
    # --- rollout engine and train-inference correction (arXiv 2606.08779) --------------------------------
    rollout_engine: str = "same"
    """Who samples: same (the trainer, no discrepancy), fp32, bf16, int8 or noise (a synced merged copy)."""
    rollout_noise: float = 0.0
    """Engine "noise": relative scale sigma of the seeded Gaussian weight noise drawn at every sync."""
    correction: str = "none"
    """none, token_truncate (TIS), token_mask, sequence_truncate, sequence_mask, rejection or dc_grpo."""
    is_clip: float = 2.0
    """C: truncation threshold of the importance ratio pi_train / pi_rollout (truncate corrections)."""
    is_band: str = "0.5,2.0"
    """lo,hi: ratios outside this band are masked (mask corrections) or rejected (rejection)."""
    is_seq_agg: str = "sum"
    """Sequence ratio: sum (exp of the summed log-ratios, TRL's) or mean (the geometric mean)."""
    rs_estimator: str = "k1"
    """Rejection: k1, k2 or k3 estimator of the log-ratio (verl's rollout_rs)."""
    rs_level: str = "token"
    """Rejection: token or sequence (the estimator's mean over the sequence)."""
    dc_lambda0: float = 0.1
    """DC-GRPO: initial Lagrange multiplier lambda."""
    dc_lr: float = 1.0
    """DC-GRPO: dual step size of lambda <- clip(lambda + lr (mean delta - c), 0, lambda_max)."""
    dc_lambda_max: float = 1.0
    """DC-GRPO: upper clip of lambda."""
    dc_target: float = -1.0
    """DC-GRPO: tolerance c on mean delta; < 0 means the bf16 engine's median delta on the first batch."""
    # --- optimiser --------------------------------------------------------------------------------------
    optimizer: str = "adamw"
    """Optimiser: adamw or sgd."""
    lr: float = 2e-3
    """Peak learning rate (the tiny embedded model needs ~1e-3; the ARCA paper used 5e-6 on 1.7B)."""
    lr_schedule: str = "constant"
    """Schedule after warm-up: constant, linear (decay to 0) or cosine (HF schedulers)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm of all adapter parameters at this value; None disables clipping."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2 (needs beta1**2 < beta2 for the theory's step bound)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    # --- evaluation -------------------------------------------------------------------------------------
    eval_prompts: int = 128
    """Held-out prompts scored before and after training (greedy accuracy and pass@k)."""
    pass_k: int = 4
    """k of pass@k (k samples per held-out prompt at the sampling temperature); 0: greedy accuracy only."""
    eval_at: str = ""
    """Also score greedy accuracy on the same held-out prompts after these optimiser steps, e.g. "6,12" (run.nc greedy_accuracy_at over eval_step); empty: before and after only."""
    # --- run ---------------------------------------------------------------------------------------------
    seed: int = 0
    """Seed for data order, sampling and adapter initialisation."""
    out: str = "runs/run"
    """Output directory (config.json, adapter/, run.nc); must not exist unless overwrite."""
    save_every: int = 0
    """Also save the adapter every K optimiser steps to checkpoints/step-<k>/ (0: the final adapter only)."""
    overwrite: bool = False
    """Replace an existing output directory (only once the new run has finished)."""
    threads: int = 0
    """torch CPU threads; 0 means all cores."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, accepted: str) -> ValueError:
            return ValueError(f"{name}={value!r} is not valid: {accepted}.")

        if self.rank <= 0:
            raise bad("rank", self.rank, "use a LoRA rank >= 1")
        self.lora_alpha()  # validates the alpha rule
        if self.scaling not in SCALINGS:
            raise bad("scaling", self.scaling, f"choose one of {SCALINGS}")
        if self.credit not in CREDITS:
            raise bad("credit", self.credit, f"choose one of {CREDITS}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"choose one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", self.lr_schedule, f"choose one of {LR_SCHEDULES}")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", self.loss_type, f"choose one of {LOSS_TYPES}")
        if self.layer_aggregate not in LAYER_AGGREGATES:
            raise bad("layer_aggregate", self.layer_aggregate, f"choose one of {LAYER_AGGREGATES}")
        if self.sharpening <= 0:
            raise bad("sharpening", self.sharpening, "use a power > 0 (1 = none, 2 = the ARCA paper's runs)")
        if self.credit_eps < 0:
            raise bad("credit_eps", self.credit_eps, "use a floor >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", self.lr, "use a finite learning rate > 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise bad("grad_clip", self.grad_clip, "use a positive norm, or None to disable clipping")
        if not self.adam_beta1**2 < self.adam_beta2 < 1:
            raise bad("adam_beta2", self.adam_beta2, "need adam_beta1**2 < adam_beta2 < 1")
        if self.num_generations < 2:
            raise bad("num_generations", self.num_generations, "GRPO needs >= 2 completions per prompt")
        if not self.task:
            from arca_lab.pretrained import NAMED_MODELS

            self.task = NAMED_MODELS[self.model].default_task if self.model in NAMED_MODELS else "arith"
        from arca_lab.tasks import TASK_NAMES

        if self.task not in TASK_NAMES:
            raise bad("task", self.task, f"choose from {list(TASK_NAMES)}")
        if self.max_prompt_length == 0:
            self.max_prompt_length = TASK_PROMPT_LENGTHS.get(self.task, 512)
        if self.max_completion_length == 0:
            self.max_completion_length = TASK_COMPLETION_LENGTHS.get(self.task, 40)
        for name in ("steps", "prompts_per_step", "grad_accum", "max_completion_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "use a positive integer")
        if (self.prompts_per_step * self.num_generations) % self.grad_accum:
            raise bad("grad_accum", self.grad_accum, "it must divide prompts_per_step * num_generations")
        if self.pass_k < 0:
            raise bad("pass_k", self.pass_k, "use k >= 1 samples per prompt, or 0 for greedy accuracy only")
        self.eval_steps()  # validates eval_at
        if self.save_every < 0:
            raise bad("save_every", self.save_every, "use 0 (final adapter only) or K >= 1 steps")
        from arca_lab.rollout.correction import check_correction_args, check_dc_args
        from arca_lab.rollout.engines import check_engine

        check_engine(self.rollout_engine, self.rollout_noise)  # before any model work: unknown or unrunnable
        check_correction_args(
            self.correction,
            is_clip=self.is_clip,
            is_band=self.band(),
            is_seq_agg=self.is_seq_agg,
            rs_estimator=self.rs_estimator,
            rs_level=self.rs_level,
        )
        check_dc_args(
            lam=self.dc_lambda0,
            target=max(self.dc_target, 0.0),
            lr=self.dc_lr,
            lam_max=self.dc_lambda_max,
        )
        if self.kl_probe_every < 0:
            raise bad("kl_probe_every", self.kl_probe_every, "use 0 (one completion per prompt) or k >= 1")
        if self.beta < 0:
            raise bad("beta", self.beta, "use a KL coefficient >= 0")
        if not self.temperature > 0:
            raise bad("temperature", self.temperature, "use a temperature > 0")
        if self.rollout_engine != "same" and self.repetition_penalty != 1.0:
            raise bad(
                "repetition_penalty", self.repetition_penalty, "rollout engines sample without it: use 1.0"
            )
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "use 0 (off) or k >= 1")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", self.repetition_penalty, "use a penalty > 0 (1 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "use 0 < top_p <= 1")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", self.lora_dropout, "use 0 <= dropout < 1")
        if self.lora_dropout > 0 and not self.train_dropout:
            raise bad(
                "lora_dropout",
                self.lora_dropout,
                "dropout is off in training unless train_dropout=True (--train-dropout): set that, or use 0",
            )
        if self.head_adapted and self.lora_dropout > 0:
            raise bad(
                "lora_dropout",
                self.lora_dropout,
                "an adapted lm_head is trained through its merged weight, which has no dropout: set it to 0",
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", self.device, "choose auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise bad("dtype", self.dtype, "choose auto, float32 or bfloat16")
        if self.arca_layers not in ("last", "all"):
            try:
                [int(i) for i in self.arca_layers.split(",")]
            except ValueError:
                raise bad(
                    "arca_layers", self.arca_layers, 'use "last", "all" or indices like "0,3"'
                ) from None
        if self.task == "math" and not self.data:
            raise bad("data", self.data, 'task "math" needs --data (a local JSONL path or an HF dataset id)')

    # --- derived values ---------------------------------------------------------------------------------
    def lora_alpha(self) -> float:
        """The numeric alpha: "2r" -> 2 * rank, "r" -> rank, "16" -> 16."""
        text = str(self.alpha).strip()
        try:
            if text.endswith("r"):
                factor = float(text[:-1]) if text[:-1] else 1.0
                value = factor * self.rank
            else:
                value = float(text)
        except ValueError:
            raise ValueError(
                f'alpha={self.alpha!r} is not valid: use a number or a rank multiple like "2r"'
            ) from None
        if value <= 0:
            raise ValueError(f"alpha={self.alpha!r} is not valid: it must be > 0")
        return value

    def adapter_scale(self) -> float:
        """s in W = W0 + s B A for the chosen scaling rule (peft: alpha/r, or alpha/sqrt(r) with rsLoRA)."""
        a = self.lora_alpha()
        return {"alpha/r": a / self.rank, "rslora": a / math.sqrt(self.rank), "const": a}[self.scaling]

    def eval_steps(self) -> tuple[int, ...]:
        """`eval_at` as sorted optimiser steps, each in [1, steps - 1] (the last step's is greedy_accuracy_after)."""
        text = str(self.eval_at).strip()
        if not text:
            return ()
        try:
            steps = sorted({int(v) for v in text.split(",")})
        except ValueError:
            raise ValueError(f'eval_at={self.eval_at!r} is not valid: write steps like "6,12"') from None
        if steps[0] < 1 or steps[-1] >= self.steps:
            raise ValueError(
                f"eval_at={self.eval_at!r} is not valid: steps must lie in [1, steps - 1 = {self.steps - 1}] "
                "(the final step is scored as greedy_accuracy_after)"
            )
        return tuple(steps)

    def band(self) -> tuple[float, float]:
        """`is_band` "lo,hi" as numbers."""
        try:
            lo, hi = (float(v) for v in str(self.is_band).split(","))
        except ValueError:
            raise ValueError(
                f'is_band={self.is_band!r} is not valid: write "lo,hi", e.g. "0.5,2.0"'
            ) from None
        return lo, hi

    @property
    def head_adapted(self) -> bool:
        """Whether lm_head carries an adapter ("all-linear" leaves the output layer out in peft)."""
        return "lm_head" in [m.strip() for m in self.target_modules.split(",")]

    @property
    def batch_completions(self) -> int:
        """Completions per optimiser step."""
        return self.prompts_per_step * self.num_generations

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; accepted keys: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # ARCA paper (arXiv 2606.00257) setup, Sec. "Setup": Qwen3-1.7B-Base on MATH, 8 prompts x K=4 per step
    # (2 x 4 accumulation), AdamW 5e-6, 10 warm-up then cosine, alpha = 2r, sharpening 2 (authors' code), 100 steps.
    "arca-paper": dict(
        model="Qwen/Qwen3-1.7B-Base",
        task="math",
        data="EleutherAI/hendrycks_math",
        rank=64,
        alpha="2r",
        target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        lora_dropout=0.05,
        train_dropout=True,  # the authors' loop trains with peft's LoRA dropout on
        credit="arca",
        sharpening=2.0,
        steps=100,
        prompts_per_step=8,
        num_generations=4,
        grad_accum=2,
        temperature=1.0,
        top_p=0.95,
        max_prompt_length=512,
        max_completion_length=512,
        lr=5e-6,
        lr_schedule="cosine",
        warmup_steps=10,
        grad_clip=1.0,
        eval_prompts=200,
        pass_k=4,
        seed=1337,
    ),
    # SmolLM2-135M-Instruct (from the `smollm` extra) on chat_arith, sized for 2 CPU cores so that its 7-run sweep
    # fits 90 min (arca_lab.sweep.cost.MODEL_COST): 10 steps of 4 prompts x 6 completions (a step takes 55 s with
    # 24 completions, 62 s with 32: most of it is sequential decoding, README), lr 3e-4 (16 steps at 2e-4 raised
    # the reward; 12 at 3e-4 too, README); greedy accuracy only (pass@k would cost 4 more generations).
    "smollm-cpu": dict(
        model="smollm2-135m",
        task="chat_arith",
        rank=8,
        alpha="2r",
        target_modules="all-linear",
        credit="uniform",
        sharpening=2.0,
        steps=10,
        prompts_per_step=4,
        num_generations=6,
        max_completion_length=96,
        temperature=0.7,  # at 1.0 a 12-step run's reward stayed at 0.03 (most samples fail); 0.7: README
        top_p=1.0,
        lr=3e-4,
        eval_prompts=64,
        pass_k=0,
    ),
    # MERL TR2026-092's published sweep (antoninrottman/simple-grpo, qwen/train_grpo.py at 6fe2c44), one run of it:
    # Qwen2.5-1.5B-Instruct on GSM8K, LoRA on the 7 projections with alpha = r and dropout 0.05, 2 prompts x 16
    # completions per step (4 per device x 8 accumulation), 300 steps, lr 5e-6 cosine with 10 % warm-up, AdamW
    # (0.9, 0.99), weight decay 0.1, clip 1, sampling T 0.6 top-p 0.85 top-k 20 repetition 1.05, KL-free (their
    # beta in {0, 0.05}: add --beta 0.05). Differences: fp16 there, the GPU default (bf16) here; their four shaped
    # rewards vs our binary correctness (arca_lab.tasks.gsm8k).
    "merl": dict(
        model="Qwen/Qwen2.5-1.5B-Instruct",
        task="gsm8k",
        data="openai/gsm8k",
        rank=16,
        alpha="r",
        target_modules="all-linear",
        lora_dropout=0.05,
        train_dropout=True,
        beta=0.0,
        steps=300,
        prompts_per_step=2,
        num_generations=16,
        grad_accum=8,
        temperature=0.6,
        top_p=0.85,
        top_k=20,
        repetition_penalty=1.05,
        max_prompt_length=256,
        max_completion_length=768,
        lr=5e-6,
        lr_schedule="cosine",
        warmup_steps=30,
        adam_beta2=0.99,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_prompts=200,
        pass_k=0,
    ),
}


def field_docs(cls: type = RunConfig) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the class source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def make_config(preset: str | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from an optional preset plus explicit overrides (overrides win)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; accepted keys: {sorted(known)}")
    values.update(overrides)
    return RunConfig(**values)
