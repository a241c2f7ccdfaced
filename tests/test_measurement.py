"""Measurement integrity of the trainer's logged numbers (issue 8): each test fails on the pre-fix trainer.

- gradient accumulation: every credit x beta x accumulation trains, and a step's metrics do not depend on how the
  step is split into micro-batches (a "max" is the max over the step, not a mean of micro-batch maxima);
- dropout: credit and probe are measured without dropout, so an adapter that has not moved reads exactly 0;
- like with like: the probe covers the same rows (one completion per prompt group) for every credit;
- logit transforms (softcap, logit scale): credit and probe score the distribution the model defines, and the
  first-batch self-check refuses a head path that does not.
"""

from __future__ import annotations

import math

import pytest
import torch
from trainer_utils import make_trainer, one_batch

from arca_lab.credit import CREDITS
from arca_lab.testing import make_tiny_causal_lm

STEP_KEYS = (
    "credit/gini",
    "credit/etr",
    "credit/fallback_fraction",
    "kl/policy_ref/mean",
    "kl/policy_ref/max",
    "kl/ref_policy/max",
    "kl/ref_policy/seq_mean",
    "kl/k3/max",
    "residual/max",
    "head_input/max_norm",
)


def _first_step_log(trainer) -> dict[str, float]:
    trainer.train()
    return next(log for log in trainer.state.log_history if "kl/policy_ref/max" in log)


@pytest.mark.parametrize("credit", CREDITS)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_step_metrics_do_not_depend_on_gradient_accumulation(tiny_model_dir, tmp_path, credit, beta):
    """Same generation batch split into 1, 2 or 4 micro-batches: same step-1 metrics (the adapter starts from a
    random B, so KL and residuals are non-zero before the first update)."""
    logs = {}
    for accum in (1, 2, 4):
        trainer, _ = make_trainer(
            tiny_model_dir,
            tmp_path / f"a{accum}",
            credit=credit,
            beta=beta,
            grad_accum=accum,
            steps=1,
            perturb_b=0.3,
        )
        logs[accum] = _first_step_log(trainer)
    ref = logs[1]
    assert ref["kl/policy_ref/max"] > 1e-4 and ref["residual/max"] > 1e-3  # the comparison means something
    for accum in (2, 4):
        for key in STEP_KEYS:
            assert logs[accum][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), (accum, key)


def test_step_max_is_the_max_over_the_step(tiny_model_dir, tmp_path):
    """A step of two micro-batches logs the max of the per-token arrays of both (kl_probe_every=1: all rows)."""
    trainer, rows = make_trainer(tiny_model_dir, tmp_path, credit="arca", kl_probe_every=1, perturb_b=0.3)
    inputs = one_batch(trainer, rows)
    halves = [
        {k: (v[i::2] if torch.is_tensor(v) and v.dim() else v) for k, v in inputs.items()} for i in (0, 1)
    ]
    maxima = []
    for part in halves:
        trainer.compute_loss(trainer.model, part)
        probe_rows = trainer.last_batch["probe_rows"].bool()
        mask = trainer.last_batch["completion_mask"].bool() & probe_rows[:, None]
        maxima.append(float(trainer.last_batch["kl_policy_ref"][mask].max()))
    trainer._flush_step_metrics("train")
    logged = trainer._metrics["train"]["kl/policy_ref/max"]
    assert len(logged) == 1 and logged[0] == pytest.approx(max(maxima), rel=1e-6)
    assert maxima[0] != pytest.approx(maxima[1])  # a mean of maxima would differ


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Tiny GPT-2 whose config keeps the architecture's 0.1 dropouts (resid, embd, attn)."""
    out = make_tiny_causal_lm(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=0)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.1
    return out


@pytest.mark.parametrize("train_dropout", [False, True])
@pytest.mark.parametrize("target_modules", ["all-linear", "lm_head"])
def test_untouched_adapter_reads_exactly_zero_despite_dropout(
    gpt2_dir, tmp_path, train_dropout, target_modules
):
    """B = 0 at the first probe: the policy is the base model, so every KL max and the residual max are exactly 0
    (dropout noise made them 0.003-0.008 before)."""
    extra = {"lora_dropout": 0.1} if train_dropout and target_modules != "lm_head" else {}
    trainer, _ = make_trainer(
        gpt2_dir,
        tmp_path,
        credit="arca" if target_modules != "lm_head" else "uniform",
        target_modules=target_modules,
        steps=1,
        train_dropout=train_dropout,
        **extra,
    )
    assert bool(trainer.loss_dropout) == train_dropout  # TRL's disable_dropout zeroes nn.Dropout otherwise
    log = _first_step_log(trainer)
    for key in ("kl/policy_ref/max", "kl/ref_policy/max", "kl/k1/max", "kl/k3/max", "residual/max"):
        assert log[key] == 0.0, key


def test_train_dropout_keeps_dropout_in_the_loss_only(gpt2_dir, tmp_path):
    """With train_dropout the loss forward drops out (two gradients differ; the on-policy loss value itself is
    exp(0) = 1 per token either way) while the credit weights, measured on a separate no-dropout forward, are
    identical."""
    trainer, rows = make_trainer(
        gpt2_dir, tmp_path, credit="surprisal", train_dropout=True, lora_dropout=0.1, perturb_b=0.3
    )
    inputs = one_batch(trainer, rows)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads, weights = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        weights.append(trainer.last_batch["weights"])
    assert not torch.allclose(grads[0], grads[1])
    assert torch.equal(weights[0], weights[1])
    assert trainer.forward_counts["measure"] == 2


@pytest.mark.parametrize("credit", CREDITS)
def test_probe_rows_are_the_same_for_every_credit(tiny_model_dir, tmp_path, credit):
    trainer, rows = make_trainer(tiny_model_dir, tmp_path, credit=credit, perturb_b=0.3)
    inputs = one_batch(trainer, rows)
    K = trainer.num_generations
    expected = torch.zeros(inputs["completion_ids"].size(0), dtype=torch.bool)
    expected[::K] = True
    assert torch.equal(inputs["probe_rows"].cpu(), expected)
    trainer.compute_loss(trainer.model, inputs)
    kl = trainer.last_batch["kl_policy_ref"]
    assert torch.isnan(kl[~expected]).all()
    assert not torch.isnan(kl[expected][inputs["completion_mask"][expected].bool()]).any()


@pytest.fixture(scope="module")
def transform_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("transform")
    return {a: make_tiny_causal_lm(root / a, a, seed=0) for a in ("gemma2", "granite")}


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_credit_path_applies_the_models_logit_transform(transform_dirs, tmp_path, arch):
    trainer, rows = make_trainer(transform_dirs[arch], tmp_path, credit="surprisal", perturb_b=0.3)
    assert trainer._transform != (1.0, None)
    inputs = one_batch(trainer, rows)
    trainer.compute_loss(trainer.model, inputs)  # the first-batch self-check passes
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1].float()
    want = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    valid = inputs["completion_mask"].bool()
    torch.testing.assert_close(trainer.last_batch["policy_logps"][valid], want[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_head_self_check_refuses_a_missing_transform(transform_dirs, tmp_path, arch):
    trainer, rows = make_trainer(transform_dirs[arch], tmp_path, credit="surprisal", perturb_b=0.3)
    trainer._transform = (1.0, None)  # what the credit path did before: a plain linear head
    inputs = one_batch(trainer, rows)
    with pytest.raises(RuntimeError, match="logit_transform"):
        trainer.compute_loss(trainer.model, inputs)


def test_head_logits_are_float32_from_low_precision_states():
    """bf16 logits turn a KL of ~1e-6 into ~1e-4; head_logits computes in float32 whatever the input dtype."""
    from arca_lab.kl import token_kl
    from arca_lab.models import head_logits

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    w = torch.randn(100, 32, generator=g)
    dw = 1e-3 * torch.randn(100, 32, generator=g)
    exact = token_kl((h.double() @ w.double().T), (h.double() @ (w + dw).double().T)).double()
    ours = token_kl(head_logits(h, w, None), head_logits(h, w + dw, None)).double()
    bf16 = token_kl(
        (h @ w.to(torch.bfloat16).T).float(), (h @ (w + dw).to(torch.bfloat16).T).float()
    ).double()
    assert head_logits(h, w, None).dtype == torch.float32
    assert (ours - exact).abs().max() < 0.05 * exact.max()
    assert (bf16 - exact).abs().max() > 10 * exact.max()  # what the old path would have logged


def test_sequence_kl_of_the_probe_is_nan_off_policy(tiny_model_dir, tmp_path):
    trainer, _ = make_trainer(
        tiny_model_dir, tmp_path, credit="uniform", steps=1, temperature=0.7, perturb_b=0.3
    )
    log = _first_step_log(trainer)
    for key in ("kl/ref_policy/seq_mean", "kl/policy_ref/seq_mean"):  # TRL logs an all-NaN metric as None
        assert log[key] is None or math.isnan(log[key]), key
    assert log["kl/policy_ref/mean"] > 0
