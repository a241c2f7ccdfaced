"""Train-inference discrepancy in the trainer (issue 10): engines wired through TRL's generation seam, mismatch
metrics, corrections on the loss, DC-GRPO's lambda, and what must not change (credits and the KL probe)."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_utils import make_trainer, one_batch

from arca_lab.rollout.correction import CORRECTIONS, CorrectionResult, dc_update, mismatch_metrics


def _lora_grads(trainer, inputs) -> torch.Tensor:
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("correction", [c for c in CORRECTIONS if c != "none"])
def test_same_engine_every_correction_is_plain_grpo(tiny_model_dir, tmp_path, correction):
    """With `same` the rollout log-probs are the trainer's: delta is exactly 0 and every correction leaves the
    loss gradient of plain GRPO (correction none) unchanged."""
    grads, deltas = {}, {}
    for kind in ("none", correction):
        trainer, rows = make_trainer(
            tiny_model_dir,
            tmp_path / kind,
            credit="surprisal",
            correction=kind,
            perturb_b=0.3,
            dc_target=0.01,
        )
        inputs = one_batch(trainer, rows)
        grads[kind] = _lora_grads(trainer, inputs)
        deltas[kind] = trainer.last_batch.get("mismatch_delta")  # none with same: no mismatch bookkeeping
    assert grads["none"].abs().max() > 1e-6
    torch.testing.assert_close(grads[correction], grads["none"], atol=1e-7, rtol=0)
    assert (deltas[correction] == 0).all()


def test_noise_engine_is_above_the_fp32_floor_and_metrics_match_their_tensors(tiny_model_dir, tmp_path):
    means = {}
    for engine, noise in (("fp32", 0.0), ("noise", 0.1)):
        trainer, rows = make_trainer(
            tiny_model_dir, tmp_path / engine, rollout_engine=engine, rollout_noise=noise, perturb_b=0.3
        )
        inputs = one_batch(trainer, rows)
        trainer.compute_loss(trainer.model, inputs)
        b = trainer.last_batch
        mask = b["completion_mask"].bool()
        means[engine] = float(b["mismatch_delta"][mask].mean())
        # the step's logged metrics are mismatch_metrics of exactly these tensors (one micro-batch here)
        trainer._flush_step_metrics("train")
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("mismatch_")}
        corr = CorrectionResult(
            b["correction_weights"], b["correction_masked"].bool(), b["correction_clipped"].bool()
        )
        direct = mismatch_metrics(b["train_logps"], b["rollout_logps"], mask, correction=corr)
        assert logged.keys() == direct.keys()
        for k in direct:
            assert logged[k] == pytest.approx(direct[k], rel=1e-6, abs=1e-12), k
        # the rollout log-probs are the engine's own, as returned by its sampler (TRL padded them)
        torch.testing.assert_close(b["rollout_logps"], inputs["sampling_per_token_logps"].float() * mask)
    assert means["fp32"] < 1e-6 and means["noise"] > 100 * max(means["fp32"], 1e-9), means


def test_engine_follows_the_trained_policy(tiny_model_dir, tmp_path):
    """After optimiser steps the engine is synced at the next generation: its logits equal the merged policy's."""
    trainer, _ = make_trainer(tiny_model_dir, tmp_path, rollout_engine="fp32", lr=5e-2, steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    engine = trainer.rollout_engine
    syncs = engine.syncs
    trainer._generate_single_turn([[5, 6, 7]], None, {}, 1)  # a new step: the engine syncs first
    assert engine.syncs == syncs + 1
    ids = torch.tensor([[3, 5, 6, 7, 8]])
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits.float()
        got = engine.model(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_credit_and_probe_use_training_log_probs_only(tiny_model_dir, tmp_path):
    """The same inputs scored with and without a (noisy) engine: identical credit weights, probe KL and loss
    gradient under correction none; only the rollout columns differ."""
    a, rows = make_trainer(tiny_model_dir, tmp_path / "a", credit="surprisal", perturb_b=0.3)
    b, _ = make_trainer(
        tiny_model_dir,
        tmp_path / "b",
        credit="surprisal",
        perturb_b=0.3,
        rollout_engine="noise",
        rollout_noise=0.1,
    )
    b.model.load_state_dict(a.model.state_dict())
    inputs = one_batch(b, rows)  # sampled by b's noisy engine, synced to b's (= a's) weights first
    a.current_gradient_accumulation_steps = 1
    a_inputs = {k: v for k, v in inputs.items() if k not in ("sampling_per_token_logps", "rollout_entropy")}
    ga, gb = _lora_grads(a, a_inputs), _lora_grads(b, inputs)
    torch.testing.assert_close(gb, ga, atol=1e-7, rtol=0)
    for key in ("weights", "kl_policy_ref", "policy_logps"):
        torch.testing.assert_close(b.last_batch[key], a.last_batch[key], equal_nan=True)
    assert float(b.last_batch["mismatch_delta"].max()) > 1e-4


def test_dc_lambda_follows_its_update_step_by_step(tiny_model_dir, tmp_path):
    trainer, _ = make_trainer(
        tiny_model_dir,
        tmp_path,
        rollout_engine="noise",
        rollout_noise=0.2,
        correction="dc_grpo",
        dc_lambda0=0.05,
        dc_lr=20.0,
        dc_target=0.0005,
        steps=3,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "dc_lambda" in log]
    assert len(logs) == 3 and logs[0]["dc_lambda"] == pytest.approx(0.05)
    lam = 0.05
    for log in logs:  # lambda <- clip(lambda + lr (mean delta - c), 0, lambda_max), logged before the update
        assert log["dc_lambda"] == pytest.approx(lam, rel=1e-9) and log["dc_c"] == 0.0005
        lam = dc_update(lam, log["mismatch_delta_mean"], target=0.0005, lr=20.0, lam_max=1.0)
    assert trainer.dc_lambda == pytest.approx(lam, rel=1e-9) and lam != 0.05


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rollout_engine="fp16"), "rollout|engine"),
        (dict(correction="tis"), "correction"),
        (dict(correction="token_truncate", is_clip=0.0), "is_clip"),
        (dict(correction="token_mask", is_band="2.0,0.5"), "band|lo"),
        (dict(correction="dc_grpo", dc_lambda_max=-1.0), "lam"),
        (dict(rollout_engine="noise"), "noise"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(tmp_path, overrides, message):
    from arca_lab.config import make_config

    with pytest.raises(ValueError, match=message):
        make_config(out=str(tmp_path / "x"), **overrides)
    assert not (tmp_path / "x").exists() and math.isfinite(1.0)
