"""GRPO with LoRA and token credit, as a narrow extension of TRL's `GRPOTrainer`.

How this departs from textbook GRPO (TRL 1.16 `GRPOTrainer`):
1. Token credit. Each completion's advantage A_i is spread over its tokens as A_i * T_i * w_{i,t}, with w from the
   chosen credit (ARCA paper, arXiv 2606.00257: the token-weighted estimator and eq. normalize). With `loss_type="grpo"` the gradient
   is the paper's estimator -mean_i A_i sum_t w_t grad log pi_t; uniform w = 1/T gives TRL's loss back exactly.
2. No extra adapted forward for credit. Adapted hidden states are read by a forward hook from the loss forward
   itself; adapted log-probs and entropies are the LoRA head applied to them (no grad). The weights are written
   into `inputs["advantages"]` when the backbone returns, before TRL's `_compute_loss` reads them.
3. One shared base pass. When anything needs the base model (arca, divergence, the KL probe, or beta > 0), one
   no-grad backbone forward with the adapter disabled runs per generation batch; its last-layer states serve all
   of them, and TRL's own reference pass is skipped (`beta` is hidden from it for that call). With LoRA on lm_head
   only (and beta = 0) not even that: the backbone is the base model's, so its states come from the loss forward.
4. Credit is never stale. Base states never change (the base is frozen) and adapted quantities come from the loss
   forward, so the weights follow the current policy whatever `num_iterations` / `steps_per_generation`.
5. LoRA on lm_head is trained. TRL's fused LM head multiplies by `lm_head.weight`, which for a peft layer is the
   frozen base weight; during our loss forward the fused head sees the merged, differentiable W0 + s B A instead.
6. KL probe. Exact full-vocabulary per-token KL to the base in both directions (temperature 1), plus k1 / k3,
   logged every step, at any beta, always over the same rows: one completion per prompt group (`kl_probe_every`),
   whatever the credit, so maxima compare across credits. The base pass covers all rows only when the credit or
   beta needs them.
7. Measured without dropout, in float32. Sampling, the base pass, the credit and the probe see the model with
   every dropout off (submodules in eval mode); head logits for credit and probe are float32 from the hidden
   states, with the model's own logit transform (softcap / scale), checked against `model(...).logits` on the
   first batch. If the loss forward itself drops out (`disable_dropout=False` with dropout in the model, or an
   attention dropout no module switch turns off), the credit and probe come from one extra no-grad forward per
   micro-batch instead of the loss forward.
8. Metrics per optimiser step. Credit, residual and KL statistics are pooled over all micro-batches of a step
   (gradient accumulation) and summarised once, so a "max" is the max over the step's rows, not a mean of maxima.
Sampling log-probabilities (from the rollout) and training log-probabilities (from the loss forward) stay separate:
the probe and the credit only ever use the latter.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from arca_lab.branch import branch_capture, find_residual_writers, first_order_residual
from arca_lab.credit import (
    CREDITS,
    LAYER_AGGREGATES,
    compute_credit_weights,
    fallback_rows,
    token_advantages,
)
from arca_lab.diagnostics import summarize_credit
from arca_lab.kl import KL_NAMES, kl_probe, summarize_kl
from arca_lab.models import (
    backbone_of,
    base_head,
    decoder_layers,
    dropout_sources,
    head_logits,
    lm_head_module_name,
    lm_head_of,
    logit_transform,
    no_dropout,
)
from arca_lab.rollout.correction import (
    CORRECTIONS,
    CorrectionResult,
    check_correction_args,
    check_dc_args,
    correction_weights,
    dc_advantages,
    dc_update,
    mismatch_metrics,
    per_token_delta,
)
from arca_lab.rollout.engines import ENGINES, check_engine, completion_logprobs, make_engine

_NEEDS_BASE = ("arca", "divergence")
LOGITS_CHUNK_ELEMENTS = 2**26
"""Float32 values per chunk of the credit/probe head logits (256 MB): SmolLM2's 49k vocabulary x 96 tokens -> 14 rows."""
KL_PROBE_KEYS = (*KL_NAMES, "ref_logps")
"""Per-token outputs of `arca_lab.kl.kl_probe` that only exist where base states were computed."""
_STEP_ONLY = ("head_input_norm", "base_head_input_norm")
"""Per-micro-batch tensors used for the step's metrics but not kept in `last_batch` (run.nc)."""


@dataclass
class ArcaGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus token credit and the KL probe. Swap it in for `GRPOConfig` together with the trainer."""

    credit: str = field(default="uniform", metadata={"help": f"Token credit, one of {CREDITS}."})
    sharpening: float = field(
        default=1.0, metadata={"help": "Power on scores before normalising (paper runs: 2)."}
    )
    credit_eps: float = field(default=1e-8, metadata={"help": "Floor added to scores (ARCA eq. normalize)."})
    arca_layers: str = field(
        default="last", metadata={"help": '"last", "all" or comma-separated layer indices.'}
    )
    layer_aggregate: str = field(default="mean", metadata={"help": "mean | max | sum | rms over layers."})
    kl_probe: bool = field(default=True, metadata={"help": "Log exact full-vocabulary KL to the base model."})
    kl_probe_every: int = field(
        default=0,
        metadata={
            "help": "When only the probe needs the base model, probe every k-th completion "
            "(0: one per prompt group, k = num_generations; 1: all). Credits that need the base probe all rows."
        },
    )

    rollout_engine: str = field(
        default="same", metadata={"help": f"Who samples: one of {ENGINES} (same: the trainer itself)."}
    )
    rollout_noise: float = field(default=0.0, metadata={"help": "Engine noise: relative weight-noise scale."})
    correction: str = field(
        default="none", metadata={"help": f"Train-inference correction, one of {CORRECTIONS}."}
    )
    is_clip: float = field(default=2.0, metadata={"help": "Truncation threshold C of the importance ratio."})
    is_band: tuple[float, float] = field(default=(0.5, 2.0), metadata={"help": "(lo, hi) ratio band."})
    is_seq_agg: str = field(default="sum", metadata={"help": "Sequence ratio: sum or mean of log-ratios."})
    rs_estimator: str = field(default="k1", metadata={"help": "Rejection estimator: k1, k2 or k3."})
    rs_level: str = field(default="token", metadata={"help": "Rejection level: token or sequence."})
    dc_lambda0: float = field(default=0.1, metadata={"help": "DC-GRPO: initial lambda."})
    dc_lr: float = field(default=1.0, metadata={"help": "DC-GRPO: dual step size."})
    dc_lambda_max: float = field(default=1.0, metadata={"help": "DC-GRPO: upper clip of lambda."})
    dc_target: float = field(
        default=-1.0,
        metadata={"help": "DC-GRPO: tolerance c; < 0: the bf16 engine's median delta, first batch."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_engine(self.rollout_engine, self.rollout_noise)
        check_correction_args(
            self.correction,
            is_clip=self.is_clip,
            is_band=tuple(self.is_band),
            is_seq_agg=self.is_seq_agg,
            rs_estimator=self.rs_estimator,
            rs_level=self.rs_level,
        )
        check_dc_args(
            lam=self.dc_lambda0,
            target=self.dc_target if self.dc_target >= 0 else 0.0,
            lr=self.dc_lr,
            lam_max=self.dc_lambda_max,
        )
        if self.credit not in CREDITS:
            raise ValueError(f"credit={self.credit!r} is not valid: choose one of {CREDITS}")
        if self.sharpening <= 0:
            raise ValueError(f"sharpening={self.sharpening} is not valid: use a power > 0")
        if self.kl_probe_every < 0:
            raise ValueError(
                f"kl_probe_every={self.kl_probe_every} is not valid: use 0 (one per group) or k >= 1"
            )
        if self.layer_aggregate not in LAYER_AGGREGATES:
            raise ValueError(
                f"layer_aggregate={self.layer_aggregate!r} is not valid: choose one of {LAYER_AGGREGATES}"
            )


class ArcaGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with token credit, a shared base pass and a KL probe (see the module docstring).

    Extra argument: `token_roles(completion_ids: list[int]) -> list[int]` labels completion tokens with role ids
    (`arca_lab.tasks.base.ROLES`) so credit mass per role is logged.
    After each loss computation, `last_batch` holds that micro-batch's per-token tensors on the CPU.
    """

    def __init__(
        self,
        model: Any,
        *args: Any,
        peft_config: Any = None,
        token_roles: Callable[[list[int]], list[int]] | None = None,
        **kwargs: Any,
    ):
        head_lora = isinstance(model, nn.Module) and _targets_head(model, peft_config)
        if head_lora:  # TRL refuses a LoRA lm_head (its fused head would ignore it); item 5 makes it train
            model, peft_config = get_peft_model(model, peft_config), None
        with _head_adapter_hidden(model) if head_lora else nullcontext():
            super().__init__(model, *args, peft_config=peft_config, **kwargs)
        if head_lora and "ref" in self.model.peft_config:
            # TRL copies a passed-in adapter as "ref" when beta > 0; the shared base pass (adapter disabled) is
            # our reference, which is the same policy for a freshly initialised adapter (B = 0).
            self.model.delete_adapter("ref")
        cfg: ArcaGRPOConfig = self.args
        if not isinstance(cfg, ArcaGRPOConfig):
            raise TypeError(
                "ArcaGRPOTrainer needs args=ArcaGRPOConfig(...) (a GRPOConfig with credit fields)"
            )
        self.token_roles = token_roles
        policy = self.accelerator.unwrap_model(self.model)
        self._is_peft = hasattr(policy, "disable_adapter")
        self._needs_base = cfg.credit in _NEEDS_BASE or cfg.kl_probe or (self.beta != 0.0 and self._is_peft)
        if self._needs_base and not self._is_peft:
            raise ValueError(
                f"credit={cfg.credit!r} / kl_probe compare the adapted model with its base: pass a peft_config "
                "(LoRA) to the trainer, or use credit in (uniform, surprisal, entropy_reduction) with kl_probe=False"
            )
        if cfg.credit == "arca_branch" and not self._is_peft:
            raise ValueError("credit='arca_branch' reads LoRA branches: pass a peft_config to the trainer")
        # Captured once: `_merged_head` later shadows get_output_embeddings during the loss forward.
        self._head = lm_head_of(policy)
        self._base_head = base_head(policy)
        self._backbone = backbone_of(policy)
        self._layers = self._arca_layer_modules(policy)
        # arca_branch: the LoRA layers that write into the residual stream and the final norm, verified on one
        # probe forward (arca_lab.branch; raises naming the fix when no writer carries LoRA).
        self._writers = find_residual_writers(policy) if cfg.credit == "arca_branch" else None
        if cfg.credit == "arca" and self._is_peft and not self._backbone_adapted(policy):
            # The full sweep's head-only ARCA runs measured Gini 0 / ETR 1: the credit is exactly uniform.
            warnings.warn(
                "credit='arca' with LoRA on lm_head only: the hidden states are the base model's, so the residual "
                "||h_adapted - h_base|| is 0 and the weights fall back to uniform (ARCA == uniform credit here); "
                "adapt layers inside the model (target_modules='all-linear') for ARCA to carry a signal",
                stacklevel=2,
            )
        # Head-only LoRA (nothing below lm_head adapted): the policy's backbone states are the base model's, so a
        # base pass would recompute what the loss forward already holds (the full sweep's head-only runs measured
        # ||h_adapted - h_base|| = 0 exactly, at ~25 % of an ARCA or divergence run's time). Credit and probe then
        # read the base states off the loss (or measurement) forward, on the same rows. Only when that is exact:
        # LoRA adapters only (no prompt tuning or other peft method), no trainable backbone parameter (e.g.
        # modules_to_save), no mixed precision (TRL's loss forward runs under autocast, the base pass does not),
        # and beta = 0 (TRL's reference log-probs are needed before the loss forward).
        self._base_is_backbone = (
            self._needs_base
            and self._is_peft
            and self.beta == 0.0
            and self.accelerator.mixed_precision == "no"
            and all(c.peft_type == PeftType.LORA for c in policy.peft_config.values())
            and not self._backbone_adapted(policy)
            and not any(p.requires_grad for p in self._backbone.parameters())
        )
        self._transform = logit_transform(policy)  # softcap / logit scale, as TRL's fused head applies them
        self._head_w32: torch.Tensor | None = (
            None  # float32 copy of the frozen output weight, made on first use
        )
        self._head_checked = False
        # After TRL's `disable_dropout`: whatever still drops out in train mode makes the loss forward noisy.
        self.loss_dropout = dropout_sources(policy)
        self.last_batch: dict[str, torch.Tensor] | None = None
        self.forward_counts = {"base": 0, "loss": 0, "measure": 0}
        self._step_parts: list[dict[str, torch.Tensor]] = []  # micro-batch tensors of the current step
        # Train-inference discrepancy (item 9): a separate engine samples; corrections act on the loss.
        self.rollout_engine = make_engine(cfg.rollout_engine, policy, noise=cfg.rollout_noise, seed=cfg.seed)
        self._engine_step = (
            -1
        )  # optimiser step whose weights the engine holds; -1: sync before the first rollout
        self._mismatch = self.rollout_engine is not None or cfg.correction != "none"
        self.dc_lambda = cfg.dc_lambda0
        self.dc_target: float | None = cfg.dc_target if cfg.dc_target >= 0 else None

    # --- rollout side --------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        beta = self.beta
        if self._needs_base:
            self.beta = 0.0  # TRL's own reference pass is replaced by the shared base pass below
        try:
            # Sampling (and the base pass below) without dropout: the policy that samples is the deterministic one.
            with no_dropout(self.accelerator.unwrap_model(self.model)):
                out = super()._generate_and_score_completions(inputs)
        finally:
            self.beta = beta
        # Kept separately: `advantages` becomes (B, T) at loss time and num_iterations > 1 reuses this dict.
        out["seq_advantages"] = out["advantages"]  # (B,)
        if self.rollout_engine is not None:
            out["rollout_entropy"] = _pad_rows(self._rollout_entropies, out["completion_ids"])  # (B, T)
        if self.dc_target is None and self.args.correction == "dc_grpo":  # first batch: c from a bf16 copy
            self.dc_target = self._bf16_median_delta(out)
        if self.token_roles is not None:
            out["token_roles"] = self._roles(out["completion_ids"], out["completion_mask"])  # (B, T)
        if self._needs_base:
            B = out["completion_ids"].size(0)
            out["probe_rows"], out["base_rows"] = self._probe_rows(B)  # (B,) bool each
        if self._needs_base and not self._base_is_backbone:  # head-only: from the loss forward instead
            out["base_hidden"], layer_states = self._base_pass(
                out, out["base_rows"]
            )  # (B, T, d), (B, L, T, d)
            if layer_states is not None:
                out["base_layer_states"] = layer_states
            if self.beta != 0.0:
                out["ref_per_token_logps"] = self._ref_logps(
                    out["base_hidden"], out["completion_ids"]
                )  # (B, T)
        return out

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        """TRL's generation seam: with a rollout engine, sync it once per optimiser step and let it sample;
        TRL pads the returned per-token log-probs into `sampling_per_token_logps` (as for vLLM)."""
        if self.rollout_engine is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if (
            self.state.global_step != self._engine_step
        ):  # new weights since the last sync (as TRL's vLLM sync)
            self.rollout_engine.sync(self.accelerator.unwrap_model(self.model))
            self._engine_step = self.state.global_step
        completion_ids, logprobs = self.rollout_engine.generate(
            prompt_ids,
            pad_token_id=self._tokenizer.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
        )
        self._rollout_entropies = self.rollout_engine.last_entropies
        return completion_ids, logprobs

    def _roles(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        roles = torch.zeros_like(completion_ids)
        for i, (ids, m) in enumerate(zip(completion_ids.tolist(), completion_mask.tolist(), strict=True)):
            n = int(sum(m))
            roles[i, :n] = torch.tensor(self.token_roles(ids[:n]), dtype=roles.dtype)
        return roles

    def _probe_rows(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probe_rows, base_rows), each (B,) bool.

        probe_rows: every k-th completion (k = kl_probe_every, 0 -> num_generations: one per prompt group), the
        sample every probe metric is taken over, the same for every credit and beta; none without the probe.
        base_rows: rows that get base states, all when the credit or beta needs them, else the probe rows.
        """
        cfg: ArcaGRPOConfig = self.args
        device = self.accelerator.device
        probe = torch.zeros(B, dtype=torch.bool, device=device)
        if cfg.kl_probe:
            probe[:: cfg.kl_probe_every or self.num_generations] = (
                True  # groups are contiguous before TRL's shuffle
            )
        all_rows = cfg.credit in _NEEDS_BASE or self.beta != 0.0
        return probe, (torch.ones_like(probe) if all_rows else probe.clone())

    @torch.no_grad()
    def _base_pass(
        self, out: dict[str, Any], rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One backbone forward with the adapter disabled, on `rows`: base states at completion-predicting positions.

        Returns the input of lm_head (B, T, d) and, when arca_layers selects decoder layers, their outputs
        (B, L, T, d); rows not in `rows` (default: `out["base_rows"]`, else all) are NaN. Runs without dropout.
        """
        if rows is None:
            rows = out.get("base_rows", torch.ones(out["completion_ids"].size(0), dtype=torch.bool))
            rows = rows.to(out["completion_ids"].device)
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)[rows]  # (b, P + T)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)[rows]
        T = out["completion_ids"].size(1)
        policy = self.accelerator.unwrap_model(self.model)
        chunk = self.args.per_device_train_batch_size
        last, layers = [], []
        with policy.disable_adapter(), no_dropout(policy):
            for s in range(0, input_ids.size(0), chunk):
                with self._capture(policy) as store:
                    self._backbone(
                        input_ids=input_ids[s : s + chunk], attention_mask=attention_mask[s : s + chunk]
                    )
                last.append(store["last"][:, -T - 1 : -1])
                if self._layers:
                    layers.append(self._layer_states(store, T))
        self.forward_counts["base"] += 1
        return _scatter_rows(torch.cat(last), rows), (
            _scatter_rows(torch.cat(layers), rows) if layers else None
        )

    def _ref_logps(self, h: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
        # TRL's reference log-probs are at the sampling temperature (its fused head divides by it).
        logits = self._base_logits(h) / self.temperature  # (B, T, V)
        return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)

    def _base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of the frozen output layer with the model's logit transform. (..., d) -> (..., V)"""
        if self._head_w32 is None:
            self._head_w32 = self._base_head.weight.detach().float()  # frozen: cast once
        return head_logits(h, self._head_w32, self._base_head.bias, self._transform)

    def _policy_logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of the adapted output layer (W0 + sBA when lm_head carries LoRA). (..., d) -> (..., V)"""
        if not isinstance(self._head, LoraLayer):
            return self._base_logits(h)
        self._base_logits(h[..., :0, :])  # makes sure the float32 base weight exists
        delta = _MergedHeadView(self._head).delta()
        w = self._head_w32 if delta is None else self._head_w32 + delta.detach().float()  # sum in float32
        return head_logits(h, w, self._base_head.bias, self._transform)

    # --- loss side -------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg: ArcaGRPOConfig = self.args
        inputs["advantages"] = inputs["seq_advantages"]
        if cfg.credit == "uniform" and not cfg.kl_probe and not self._mismatch:
            with self._merged_head(model):
                self.forward_counts["loss"] += 1
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self._head_checked:
            self._check_head(inputs)
        if self.loss_dropout and model.training:
            # The loss forward drops out: measure credit and probe on a separate forward without dropout.
            inputs["advantages"] = self._token_advantages(inputs, self._measure_forward(inputs))
            with self._merged_head(model):
                self.forward_counts["loss"] += 1
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        fired: list[bool] = []

        def on_backbone_output(store: dict[str, Any]) -> None:
            inputs["advantages"] = self._token_advantages(inputs, store)  # (B, T)
            fired.append(True)

        with self._merged_head(model), self._capture(model, on_backbone_output, branches=True):
            self.forward_counts["loss"] += 1
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not fired:
            raise RuntimeError("the loss forward never ran the backbone: this TRL version is not supported")
        return loss

    @torch.no_grad()
    def _measure_forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """One no-grad backbone forward of the adapted policy without dropout; returns the hook store."""
        policy = self.accelerator.unwrap_model(self.model)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P + T)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with no_dropout(policy), self._capture(policy, branches=True) as store:
            self._backbone(input_ids=input_ids, attention_mask=attention_mask)
        self.forward_counts["measure"] += 1
        return store

    @torch.no_grad()
    def _check_head(self, inputs: dict[str, Any]) -> None:
        """First batch: the credit/probe path's logits must equal the model's own `model(...).logits`.

        Catches an output transform the path does not know (a softcap, a logit scale, a head that is not a
        plain linear map of the backbone output). Tolerance: 8 ulp of the model dtype (at least 1e-5) times
        (1 + max |logit|).
        """
        policy = self.accelerator.unwrap_model(self.model)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)[:1]  # (1, P + T)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)[:1]
        with no_dropout(policy), self._capture(policy) as store:
            want = policy(input_ids=input_ids, attention_mask=attention_mask).logits  # (1, P + T, V)
        got = self._policy_logits(store["last"])  # (1, P + T, V) float32
        valid = attention_mask.bool()  # (1, P + T)
        want32 = want.float()[valid]
        err = float((got[valid] - want32).abs().max())
        tol = max(8 * torch.finfo(want.dtype).eps, 1e-5) * (1 + float(want32.abs().max()))
        if not err <= tol:  # NaN fails too
            raise RuntimeError(
                f"the credit/KL-probe logits differ from {type(policy).__name__}(...).logits by {err:.3g} "
                f"(tolerance {tol:.3g}): this architecture transforms its head output in a way arca-lab does not "
                "reproduce (see arca_lab.models.logit_transform); train with credit='uniform' and kl_probe=False, "
                "or add the transform there"
            )
        self._head_checked = True

    @torch.no_grad()
    def _token_advantages(self, inputs: dict[str, Any], store: dict[str, Any]) -> torch.Tensor:
        cfg: ArcaGRPOConfig = self.args
        ids, mask = inputs["completion_ids"], inputs["completion_mask"]  # (B, T)
        T = ids.size(1)
        h_last = store["last"][:, -T - 1 : -1]  # (B, T, d): input of lm_head at positions predicting y_t
        no_rows = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
        base_rows = inputs.get("base_rows", no_rows)
        h_base_last = inputs.get("base_hidden")  # (B, T, d) or None
        if self._base_is_backbone:  # head-only: what the base pass would return (NaN off its rows)
            h_base_last = _scatter_rows(h_last[base_rows], base_rows)
        if self._layers:  # ARCA on chosen decoder layers: (L, B, T, d)
            h_adapted, h_base = self._layer_states(store, T).transpose(0, 1), inputs.get("base_layer_states")
            if self._base_is_backbone:
                h_base = _scatter_rows(h_adapted.transpose(0, 1)[base_rows], base_rows)
            h_base = None if h_base is None else h_base.transpose(0, 1)
        else:
            h_adapted, h_base = h_last, h_base_last
        probe_rows = inputs.get("probe_rows", no_rows)
        stats = self._head_stats(h_last, h_base_last, ids, mask, base_rows)
        # arca_branch: ||J_N(u_t) D_t||, the residual writers' LoRA outputs through the final norm's Jacobian: the
        # direct-path part of ARCA's residual, not ARCA to first order in general (theory/arca_branch.md).
        branch = first_order_residual(store["branch"], T) if "branch" in store else None  # (B, T)
        weights, scores = compute_credit_weights(
            cfg.credit,
            completion_mask=mask,
            per_token_logps=stats["policy_logps"],
            entropies=stats["policy_entropy"],
            ref_per_token_logps=stats.get("ref_logps"),
            h_adapted=h_adapted,
            h_base=h_base,
            branch_norms=branch,
            layer_aggregate=cfg.layer_aggregate,
            sharpening=cfg.sharpening,
            eps=cfg.credit_eps,
        )
        advantages = token_advantages(inputs["seq_advantages"], weights, mask)  # (B, T)
        mismatch = self._mismatch_part(inputs, stats, mask) if self._mismatch else {}
        if mismatch:
            advantages = self._corrected(advantages, mismatch, mask)  # (B, T)
        fallback = (
            fallback_rows(scores, mask, cfg.sharpening, cfg.credit_eps)
            if cfg.credit != "uniform"
            else torch.zeros_like(probe_rows)
        )  # (B,)
        # Probe tensors only on the probe rows (NaN elsewhere): the same sample for every credit.
        probe = {
            k: torch.where(probe_rows[:, None], v, torch.nan) for k, v in stats.items() if k in KL_PROBE_KEYS
        }
        residual = torch.full_like(stats["policy_logps"], torch.nan)  # (B, T): ARCA alpha_t at the last layer
        base_norm = torch.full_like(residual, torch.nan)
        if h_base_last is not None:
            residual = (h_last.float() - h_base_last.float()).norm(dim=-1)
            base_norm = h_base_last.float().norm(dim=-1)
        part = {
            "completion_ids": ids,
            "completion_mask": mask,
            "weights": weights,
            "scores": scores,
            "credit_fallback": fallback,
            "probe_rows": probe_rows,
            "advantages": inputs["seq_advantages"],
            "token_advantages": advantages,
            "head_input_norm": h_last.float().norm(dim=-1),  # (B, T)
            "residual": torch.where(probe_rows[:, None], residual, torch.nan),
            "base_head_input_norm": torch.where(probe_rows[:, None], base_norm, torch.nan),
            **({"token_roles": inputs["token_roles"]} if "token_roles" in inputs else {}),
            "policy_logps": stats["policy_logps"],
            "policy_entropy": stats["policy_entropy"],
            **probe,
            **mismatch,
        }
        part = {k: v.detach().float().cpu() for k, v in part.items()}
        self.last_batch = {k: v for k, v in part.items() if k not in _STEP_ONLY}
        self._step_parts.append(part)
        if not self.model.training:  # evaluation: no optimiser step to wait for
            self._flush_step_metrics("eval")
        return advantages

    def _head_stats(self, h, h_base, completion_ids, completion_mask, base_rows) -> dict[str, torch.Tensor]:
        """Adapted-head log-probs and entropy on every row; the KL probe against the base on `base_rows`.

        All at temperature 1, float32 logits with the model's logit transform. Chunked over rows so that the
        (rows, T, V) logits of a chunk hold at most `LOGITS_CHUNK_ELEMENTS` values (at least one row): the KL probe's
        full-vocabulary pass never holds a whole batch's logits. Probe tensors are NaN on rows without base states.
        """
        V = self._base_head.weight.size(0)
        chunk = max(1, int(LOGITS_CHUNK_ELEMENTS // max(1, h.size(1) * V)))  # rows per chunk
        # Rows without base states get NaN, so every micro-batch has the same keys.
        probing = h_base is not None
        parts: list[dict[str, torch.Tensor]] = []
        for s in range(0, h.size(0), chunk):
            sl = slice(s, s + chunk)
            policy_logits = self._policy_logits(h[sl])  # (b, T, V) float32, one projection per row
            logp = policy_logits.log_softmax(-1)
            part = {
                "policy_logps": logp.gather(-1, completion_ids[sl].unsqueeze(-1)).squeeze(-1),  # (b, T)
                "policy_entropy": -(logp.exp() * logp).sum(-1),
            }
            if (
                self._mismatch
            ):  # pi_train at the sampling temperature, what the engine's log-probs compare with
                # at temperature 1 these are the log-probs just computed: no second log_softmax over the vocabulary
                logp_tau = (
                    logp if self.temperature == 1.0 else (policy_logits / self.temperature).log_softmax(-1)
                )
                part["train_logps"] = logp_tau.gather(-1, completion_ids[sl].unsqueeze(-1)).squeeze(-1)
                part["train_entropy"] = -(logp_tau.exp() * logp_tau).sum(-1)
            if probing:
                rows = base_rows[sl]  # (b,)
                probed: dict[str, torch.Tensor] = {}
                if rows.any():
                    ref_logits = self._base_logits(h_base[sl][rows])
                    probed = kl_probe(
                        policy_logits[rows], ref_logits, completion_ids[sl][rows], completion_mask[sl][rows]
                    )
                for k in KL_PROBE_KEYS:  # NaN on rows without base states
                    full = part["policy_logps"].new_full(part["policy_logps"].shape, float("nan"))
                    if probed:
                        full[rows] = probed[k]
                    part[k] = full
            parts.append(part)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def measurement_info(self) -> dict[str, Any]:
        """How the logged credit and probe numbers were taken (run.nc attrs `measurement_json`)."""
        cfg: ArcaGRPOConfig = self.args
        scale, cap = self._transform
        return {
            "dropout": "off: sampling, base pass, credit and probe run with every submodule in eval mode",
            "loss_forward_dropout": self.loss_dropout,
            "credit_and_probe_forward": "separate no-grad forward"
            if self.loss_dropout
            else "the loss forward",
            "base_states": "none (no credit, probe or beta needs them)"
            if not self._needs_base
            else "the credit/probe forward's own (no adapter below lm_head)"
            if self._base_is_backbone
            else "one no-grad base pass per generation batch, adapter disabled",
            "logits_dtype": "float32 (from hidden states in the model dtype)",
            "logit_transform": {"logit_scale": scale, "final_logit_softcapping": cap},
            "probe_rows": f"every {cfg.kl_probe_every or self.num_generations}-th completion"
            if cfg.kl_probe
            else "none",
            "probe_temperature": 1.0,
            "sequence_kl_estimates": self._samples_from_policy(),
            "rollout_engine": cfg.rollout_engine,
            "rollout_noise": cfg.rollout_noise,
            "correction": cfg.correction,
            "dc_target": self.dc_target,
            "dc_target_source": "config" if cfg.dc_target >= 0 else "bf16 engine median delta, first batch",
            "engine_sync_seconds": getattr(self.rollout_engine, "sync_seconds", 0.0),
            "engine_generate_seconds": getattr(self.rollout_engine, "generate_seconds", 0.0),
        }

    # --- train-inference discrepancy ----------------------------------------------------------------------
    def _mismatch_part(self, inputs: dict[str, Any], stats: dict[str, torch.Tensor], mask: torch.Tensor):
        """Per-token train vs rollout quantities of one micro-batch (arca_lab.rollout.correction)."""
        cfg: ArcaGRPOConfig = self.args
        train = stats["train_logps"]  # (B, T) log pi_train(y_t) at the sampling temperature, float32
        # "same": the trainer's own numbers stand for the rollout's, so the discrepancy is 0 by construction.
        rollout = inputs["sampling_per_token_logps"].float() if self.rollout_engine is not None else train
        corr = correction_weights(
            cfg.correction,
            train,
            rollout,
            mask,
            is_clip=cfg.is_clip,
            is_band=tuple(cfg.is_band),
            is_seq_agg=cfg.is_seq_agg,
            rs_estimator=cfg.rs_estimator,
            rs_level=cfg.rs_level,
        )
        entropy = inputs.get("rollout_entropy", stats["train_entropy"])  # (B, T)
        return {
            "train_logps": train,
            "rollout_logps": torch.where(mask.bool(), rollout, 0.0),
            "mismatch_delta": per_token_delta(train, rollout, mask),
            "correction_weights": corr.weights,
            "correction_masked": corr.masked.float(),
            "correction_clipped": corr.clipped.float(),
            "train_entropy": stats["train_entropy"],
            "rollout_entropy": entropy,
        }

    def _corrected(
        self, advantages: torch.Tensor, m: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """Apply the correction to the per-token advantages A_t (B, T).

        IS weights w_t >= 0 multiply A_t: for TRL's clipped loss min(r A w, clip(r) A w) = w min(r A, clip(r) A),
        exactly TRL's `per_token_loss * importance_sampling_ratio` (its vLLM path), and the beta KL term, added
        after, is left alone as there. DC-GRPO shapes the advantage: A_t - lambda delta_t (arXiv 2606.08779)."""
        if self.args.correction == "dc_grpo":
            return dc_advantages(advantages, m["mismatch_delta"], self.dc_lambda, mask)
        return advantages * m["correction_weights"]

    @torch.no_grad()
    def _bf16_median_delta(self, out: dict[str, Any]) -> float:
        """DC-GRPO's default tolerance c: the median delta between a bf16 copy of the current policy and the policy
        itself (both teacher-forced, at the sampling temperature) on the first batch: the paper's c = 0.0037 was
        set for a 150k-token vocabulary, so it is measured here instead."""
        policy = self.accelerator.unwrap_model(self.model)
        mask = out["completion_mask"].bool()  # (B, T)
        prompts = [p[m.bool()].tolist() for p, m in zip(out["prompt_ids"], out["prompt_mask"], strict=True)]
        completions = [c[m].tolist() for c, m in zip(out["completion_ids"], mask, strict=True)]
        kw = dict(pad_token_id=self._tokenizer.pad_token_id, temperature=self.temperature)
        with no_dropout(policy):
            train = completion_logprobs(policy, prompts, completions, **kw)
        bf16 = completion_logprobs(make_engine("bf16", policy).model, prompts, completions, **kw)
        padded = [_pad_rows(x, out["completion_ids"]).cpu() for x in (train, bf16)]  # (B, T) each
        delta = per_token_delta(padded[0], padded[1], mask.cpu())
        return float(delta[mask.cpu()].median())

    # --- per-step metrics --------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:  # TRL counts micro-batches in _step
            self._flush_step_metrics("train")
        return loss

    def _flush_step_metrics(self, mode: str) -> None:
        """Summarise the micro-batches of one optimiser step together and log each metric once."""
        parts, self._step_parts = self._step_parts, []
        if not parts:
            return
        metrics = self._metrics[mode]
        for k, v in step_metrics(parts, self._samples_from_policy()).items():
            metrics[k].append(v)
        if self._mismatch:
            cfg: ArcaGRPOConfig = self.args
            mm = mismatch_step_metrics(parts)
            for k, v in mm.items():
                metrics[k].append(v)
            if cfg.correction == "dc_grpo":
                metrics["dc_lambda"].append(self.dc_lambda)  # the lambda this step used
                metrics["dc_c"].append(self.dc_target)  # the tolerance c (config field dc_target)
                if mode == "train":
                    self.dc_lambda = dc_update(
                        self.dc_lambda,
                        mm["mismatch_delta_mean"],
                        target=self.dc_target,
                        lr=cfg.dc_lr,
                        lam_max=cfg.dc_lambda_max,
                    )

    def _samples_from_policy(self) -> bool:
        """Whether completions are samples of π_θ itself (temperature 1, no truncation): sequence KL estimates
        are unbiased only then."""
        a = self.args
        return (
            self.temperature == 1.0
            and a.top_p == 1.0
            and not a.top_k
            and a.min_p is None
            and a.repetition_penalty == 1.0
        )

    # --- hooks -----------------------------------------------------------------------------------------
    def _arca_layer_modules(self, policy: nn.Module) -> list[nn.Module]:
        spec = self.args.arca_layers
        if spec == "last":
            return []
        layers = decoder_layers(policy)
        idx = range(len(layers)) if spec == "all" else [int(i) for i in spec.split(",")]
        try:
            return [layers[i] for i in idx]
        except IndexError:
            raise ValueError(f"arca_layers={spec!r}: the model has {len(layers)} decoder layers") from None

    @staticmethod
    def _backbone_adapted(policy: nn.Module) -> bool:
        return any(isinstance(m, LoraLayer) for m in backbone_of(policy).modules())

    @contextmanager
    def _capture(
        self, policy: nn.Module, on_done: Callable[[dict], None] | None = None, branches: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Forward hooks storing detached hidden states; `on_done` runs when the backbone returns."""
        store: dict[str, Any] = {"layers": []}
        handles, stack = [], ExitStack()
        for layer in self._layers:
            handles.append(
                layer.register_forward_hook(lambda m, a, o: store["layers"].append(_first(o).detach()))
            )
        if branches and self._writers is not None:  # D and u, filled before on_done runs
            store["branch"] = stack.enter_context(branch_capture(policy, self._writers))

        def backbone_hook(module, args, output):
            store["last"] = _first(output).detach()  # (B, P + T, d) after the final norm
            if on_done is not None:
                on_done(store)

        handles.append(self._backbone.register_forward_hook(backbone_hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()
            stack.close()

    @staticmethod
    def _layer_states(store: dict[str, Any], T: int) -> torch.Tensor:
        return torch.stack([s[:, -T - 1 : -1] for s in store["layers"]], dim=1)  # (B, L, T, d)

    @contextmanager
    def _merged_head(self, model: nn.Module) -> Iterator[None]:
        """During the loss forward, let TRL's fused head see W0 + s B A when lm_head carries LoRA (see item 5)."""
        if not isinstance(self._head, LoraLayer):
            with nullcontext():
                yield
            return
        base = self.accelerator.unwrap_model(model).get_base_model()
        shim = _MergedHeadView(self._head)
        base.get_output_embeddings = lambda: shim
        try:
            yield
        finally:
            del base.get_output_embeddings


def step_metrics(parts: list[dict[str, torch.Tensor]], sequence_estimates: bool = True) -> dict[str, float]:
    """Metrics of one optimiser step from its micro-batches' tensors (rows pooled, then summarised once).

    - credit/*: `summarize_credit` over every row of the step (gini, etr, effn, tokens, role_mass/*, score/*,
      fallback_fraction);
    - head_input/max_norm: max ||x_t|| over valid tokens of every row (x = input of lm_head, adapted policy);
    - on the probe rows only (one completion per prompt group; absent without the probe): residual/{mean,max}
      (||h_adapted - h_base|| of the last layer over valid tokens), head_input/base_max_norm, and the KL
      summaries of `arca_lab.kl.summarize_kl` (kl/{policy_ref,ref_policy,k1,k3}/{mean,max,seq_mean}).
    Empty selections give NaN, never an error.
    """
    b = {k: _cat_rows([p[k] for p in parts]) for k in parts[0]}
    mask = b["completion_mask"].bool()  # (B, T)
    credit = summarize_credit(
        b["weights"], mask, roles=b.get("token_roles"), raw_scores=b["scores"], fallback=b["credit_fallback"]
    )
    out = {f"credit/{k}": v for k, v in credit.items()}
    out["head_input/max_norm"] = _masked_max(b["head_input_norm"], mask)
    rows = b["probe_rows"].bool()  # (B,)
    if rows.any() and "kl_policy_ref" in b:
        pm = mask[rows]  # (b, T)
        res = b["residual"][rows][pm]
        out["residual/mean"] = float(res.mean()) if res.numel() else math.nan
        out["residual/max"] = _masked_max(b["residual"][rows], pm)
        out["head_input/base_max_norm"] = _masked_max(b["base_head_input_norm"][rows], pm)
        probe = {k: b[k][rows] for k in (*KL_PROBE_KEYS, "policy_logps")}
        out.update(summarize_kl(probe, pm, sequence_estimates=sequence_estimates))
    return out


def mismatch_step_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The step's train-inference metrics (arca_lab.rollout.correction.mismatch_metrics names) from all its
    micro-batches pooled, plus `rollout_entropy_mean` / `train_entropy_mean` (per token at the sampling
    temperature, mean over valid tokens)."""
    b = {k: _cat_rows([p[k] for p in parts]) for k in parts[0]}
    mask = b["completion_mask"].bool()
    corr = CorrectionResult(
        b["correction_weights"], b["correction_masked"].bool(), b["correction_clipped"].bool()
    )
    out = mismatch_metrics(b["train_logps"], b["rollout_logps"], mask, correction=corr)
    out["rollout_entropy_mean"] = float(b["rollout_entropy"][mask].mean()) if mask.any() else math.nan
    out["train_entropy_mean"] = float(b["train_entropy"][mask].mean()) if mask.any() else math.nan
    return out


def _pad_rows(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Right-pad ragged per-token lists into a tensor shaped (and placed) like `like` (B, T), zeros elsewhere."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[: like.size(1)], dtype=torch.float32)
    return out


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> float:
    vals = x[mask]
    return float(vals.max()) if vals.numel() else math.nan


def _cat_rows(xs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (b, ...) tensors along rows, zero-padding the token dim of (b, T) tensors to the longest."""
    if xs[0].dim() < 2:
        return torch.cat(xs)
    T = max(x.size(1) for x in xs)
    return torch.cat([torch.nn.functional.pad(x, (0, T - x.size(1))) for x in xs])


@contextmanager
def _head_adapter_hidden(model: nn.Module) -> Iterator[None]:
    """While TRL's __init__ runs, `get_output_embeddings` returns the base layer, so its lm_head check passes."""
    base = model.get_base_model()
    frozen = base_head(model)
    base.get_output_embeddings = lambda: frozen
    try:
        yield
    finally:
        del base.get_output_embeddings


def _targets_head(model: nn.Module, peft_config: Any) -> bool:
    """Whether a peft config would put an adapter on the output layer (peft's "all-linear" leaves it out)."""
    targets = getattr(peft_config, "target_modules", None)
    if targets is None or targets == "all-linear":
        return False
    name = lm_head_module_name(model)
    if isinstance(targets, str):  # peft treats a string as a regex over full module names
        return re.fullmatch(targets, name) is not None
    return name in targets or name.split(".")[-1] in targets


class _MergedHeadView:
    """What TRL's fused head reads from lm_head (`weight`, `bias`), with the active LoRA deltas merged in."""

    def __init__(self, layer: LoraLayer):
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        delta = self.delta()
        w = self.layer.base_layer.weight
        return w if delta is None else w + delta  # differentiable in lora_A / lora_B

    def delta(self) -> torch.Tensor | None:
        """Σ s B A over the active adapters (V, d), or None when adapters are disabled or absent."""
        if self.layer.disable_adapters:
            return None
        deltas = [
            self.layer.get_delta_weight(n) for n in self.layer.active_adapters if n in self.layer.lora_A
        ]
        return sum(deltas[1:], deltas[0]) if deltas else None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.base_layer.bias


def _scatter_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(b, ...) computed on the selected rows -> (B, ...) with NaN elsewhere."""
    full = x.new_full((rows.numel(), *x.shape[1:]), float("nan"))
    full[rows] = x
    return full


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]
