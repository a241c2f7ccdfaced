"""ArcaGRPOTrainer: gradient = the ARCA estimator, KL probe = exact KL, only adapters train, forward-pass count."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from trainer_utils import make_trainer, one_batch

import arca_lab.trainer as trainer_module


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _completion_logps(model, inputs) -> torch.Tensor:
    """Hand-written log pi(y_t) from a plain (unfused) forward of the adapted model: (B, T)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    T = inputs["completion_ids"].size(1)
    logits = (
        model(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1].float()
    )  # (B, T, V), temperature 1
    return logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("target_modules", ["all-linear", "lm_head"])
def test_gradient_is_the_token_weighted_estimator(tiny_model_dir, tmp_path, monkeypatch, target_modules):
    """grad of TRL's loss with A*T*w == grad of -mean_i A_i sum_t w_t log pi_t, for random non-uniform w."""
    g = torch.Generator().manual_seed(7)

    def random_weights(credit, *, completion_mask, **kwargs):
        raw = (
            torch.rand(completion_mask.shape, generator=g) ** 4 * completion_mask
        )  # (B, T), far from uniform
        return raw / raw.sum(-1, keepdim=True).clamp_min(1e-12), raw

    monkeypatch.setattr(trainer_module, "compute_credit_weights", random_weights)
    trainer, rows = make_trainer(
        tiny_model_dir, tmp_path, credit="surprisal", perturb_b=0.05, target_modules=target_modules
    )
    inputs = one_batch(trainer, rows)
    A = inputs["seq_advantages"]
    assert A.abs().sum() > 0, "the test needs non-zero advantages"
    params = _lora_params(trainer.model)
    loss = trainer.compute_loss(trainer.model, inputs)
    got = torch.autograd.grad(loss, list(params.values()))

    w = trainer.last_batch["weights"]  # the weights the trainer actually used
    assert trainer.last_batch["weights"][inputs["completion_mask"].bool()].std() > 0.05  # non-uniform
    logps = _completion_logps(trainer.model, inputs)
    hand = -(A[:, None] * w * logps * inputs["completion_mask"]).sum(-1).mean()
    want = torch.autograd.grad(hand, list(params.values()))
    assert any(x.abs().max() > 1e-6 for x in want)
    for name, a, b in zip(params, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)


def test_uniform_credit_is_plain_grpo(tiny_model_dir, tmp_path):
    """Uniform w = 1/T turns A*T*w back into A: the loss equals TRL's with sequence advantages."""
    trainer, rows = make_trainer(tiny_model_dir, tmp_path, credit="uniform", kl_probe=True, perturb_b=0.05)
    inputs = one_batch(trainer, rows)
    ours = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(trainer.last_batch["token_advantages"][:, 0], inputs["seq_advantages"])
    plain = dict(inputs, advantages=inputs["seq_advantages"])
    theirs = trainer_module.GRPOTrainer._compute_loss(trainer, trainer.model, plain)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("target_modules", ["all-linear", "lm_head"])
def test_kl_probe_matches_a_merged_copy(tiny_model_dir, tmp_path, target_modules):
    trainer, rows = make_trainer(
        tiny_model_dir,
        tmp_path,
        credit="arca",
        perturb_b=0.3,
        target_modules=target_modules,
        kl_probe_every=1,
    )
    inputs = one_batch(trainer, rows)
    trainer.compute_loss(trainer.model, inputs)
    probe = trainer.last_batch
    assert probe["probe_rows"].all()  # kl_probe_every=1: every row is probed
    merged = copy.deepcopy(trainer.model).merge_and_unload()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():
        lp = _completion_logits(merged, inputs).double().log_softmax(-1)  # (B, T, V)
        lq = _completion_logits(base, inputs).double().log_softmax(-1)
    kl_pq = (lp.exp() * (lp - lq)).sum(-1)
    kl_qp = (lq.exp() * (lq - lp)).sum(-1)
    assert kl_pq[mask].max() > 1e-3, "the adapter must move the policy for this test to mean anything"
    torch.testing.assert_close(probe["kl_policy_ref"][mask].double(), kl_pq[mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe["kl_ref_policy"][mask].double(), kl_qp[mask], atol=1e-6, rtol=1e-5)


def _completion_logits(model, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    T = inputs["completion_ids"].size(1)
    return model(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1]


@pytest.mark.parametrize("target_modules", ["all-linear", "lm_head"])
def test_training_moves_adapters_only(tiny_model_dir, tmp_path, target_modules):
    trainer, _ = make_trainer(tiny_model_dir, tmp_path, credit="arca", target_modules=target_modules, lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(("lm_head" in n) == (target_modules == "lm_head") for n in lora)
    moved = [n for n in lora if "lora_B" in n and not torch.equal(before[n], after[n])]
    assert moved, "no adapter weight changed"
    for n in before:
        if "lora_" not in n:  # base_layer weights, norms, embeddings, lm_head base
            assert torch.equal(before[n], after[n]), f"base weight {n} changed"


def test_arca_on_a_head_only_adapter_warns_and_is_uniform(tiny_model_dir, tmp_path):
    # lm_head-only LoRA leaves every hidden state at the base model's: residual 0 -> uniform fallback
    with pytest.warns(UserWarning, match=r"lm_head only.*fall back to uniform"):
        trainer, rows = make_trainer(
            tiny_model_dir, tmp_path, credit="arca", target_modules="lm_head", perturb_b=0.5
        )
    inputs = one_batch(trainer, rows)
    trainer.compute_loss(trainer.model, inputs)  # the loss forward's hook computes the credit weights
    mask = inputs["completion_mask"].bool()
    w = trainer.last_batch["weights"]  # (B, T)
    lengths = mask.sum(-1, keepdim=True).expand_as(w)
    torch.testing.assert_close(w[mask], 1.0 / lengths[mask].float())  # 1/T_i on every token


@pytest.mark.parametrize(
    "credit, extra", [("divergence", {}), ("uniform", {}), ("arca", {"arca_layers": "all"})]
)
def test_head_only_base_states_come_from_the_loss_forward(tiny_model_dir, tmp_path, credit, extra):
    """No adapter below lm_head: no base pass runs, and credit weights, scores and the KL probe on its rows are
    bitwise those of a trainer that runs the base pass (divergence, arca: every row; uniform: the probe rows;
    arca over all decoder layers: their states too)."""
    batches, counts = {}, {}
    for mode in ("reused", "base pass"):
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*lm_head only.*"
            )  # ARCA == uniform here: tested above
            trainer, rows = make_trainer(
                tiny_model_dir,
                tmp_path / mode,
                credit=credit,
                target_modules="lm_head",
                perturb_b=0.5,
                **extra,
            )
        assert trainer._base_is_backbone
        trainer._base_is_backbone = mode == "reused"
        inputs = one_batch(trainer, rows)
        assert ("base_hidden" in inputs) == (mode == "base pass")
        trainer.compute_loss(trainer.model, inputs)
        batches[mode], counts[mode] = trainer.last_batch, dict(trainer.forward_counts)
    assert counts == {
        "reused": {"base": 0, "loss": 1, "measure": 0},
        "base pass": {"base": 1, "loss": 1, "measure": 0},
    }
    assert batches["reused"].keys() == batches["base pass"].keys()
    for key, value in batches["reused"].items():
        assert torch.equal(value.isnan(), batches["base pass"][key].isnan()), key  # the same rows measured
        assert torch.equal(value.nan_to_num(), batches["base pass"][key].nan_to_num()), key
    probe = batches["reused"]["kl_ref_policy"]
    assert probe.isfinite().any() and (probe.nan_to_num() > 0).any()  # the probe measured something


def test_all_linear_keeps_its_base_pass(tiny_model_dir, tmp_path):
    trainer, _ = make_trainer(tiny_model_dir, tmp_path, credit="divergence", target_modules="all-linear")
    assert not trainer._base_is_backbone


def test_head_only_training_without_the_base_pass_is_unchanged(tiny_model_dir, tmp_path):
    """Through TRL's loop (a shuffled generation batch split into 2 micro-batches, 3 optimiser steps): every logged
    metric and the last batch's tensors of a head-only divergence run equal the same run with the base pass
    forced, and the adapter moved (the probe compares two different policies)."""
    logs, batches = {}, {}
    for mode in ("reused", "base pass"):
        trainer, _ = make_trainer(
            tiny_model_dir,
            tmp_path / mode,
            credit="divergence",
            target_modules="lm_head",
            grad_accum=2,
            steps=3,
            lr=0.05,
        )
        trainer._base_is_backbone = mode == "reused"
        trainer.train()
        logs[mode] = [
            {k: v for k, v in log.items() if "_per_second" not in k and "time" not in k}
            for log in trainer.state.log_history
        ]
        batches[mode] = trainer.last_batch
        assert trainer.forward_counts["base"] == (0 if mode == "reused" else 3)
    assert logs["reused"] == logs["base pass"]
    for key, value in batches["reused"].items():
        assert torch.equal(value.nan_to_num(), batches["base pass"][key].nan_to_num()), key
    assert max(log.get("kl/ref_policy/max", 0.0) for log in logs["reused"]) > 0


class _ForwardCounter:
    """Counts backbone forwards outside generation (generate's own forwards are the rollout, not ours)."""

    def __init__(self, trainer, monkeypatch):
        self.count = 0
        self.in_generate = False
        original = transformers.GenerationMixin.generate

        def generate(model, *args, **kwargs):
            self.in_generate = True
            try:
                return original(model, *args, **kwargs)
            finally:
                self.in_generate = False

        monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
        trainer._backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.count += not self.in_generate


@pytest.mark.parametrize(
    ("credit", "kl_probe", "beta", "expected"),
    [
        ("uniform", False, 0.0, 1),  # plain GRPO: the loss forward only
        ("surprisal", False, 0.0, 1),  # adapted quantities come from the loss forward itself
        ("entropy_reduction", False, 0.0, 1),
        ("arca_branch", False, 0.0, 1),  # LoRA branches are read by hooks during the loss forward
        ("uniform", True, 0.0, 2),  # + the shared base pass
        ("arca", False, 0.0, 2),
        ("arca", True, 0.0, 2),
        ("divergence", True, 0.0, 2),
        ("arca", True, 0.05, 2),  # TRL's reference pass is the shared base pass, not a third forward
        ("uniform", False, 0.05, 2),  # = plain TRL with beta > 0 (reference + loss)
    ],
)
def test_forward_passes_per_step(tiny_model_dir, tmp_path, monkeypatch, credit, kl_probe, beta, expected):
    trainer, _ = make_trainer(tiny_model_dir, tmp_path, credit=credit, kl_probe=kl_probe, beta=beta, steps=2)
    counter = _ForwardCounter(trainer, monkeypatch)
    trainer.train()
    # + one 1-row forward on the first batch: the head self-check, whenever credit or probe read the head
    check = credit != "uniform" or kl_probe
    assert counter.count == 2 * expected + check


def test_plain_trl_with_beta_makes_two_forwards(tiny_model_dir, tmp_path, monkeypatch):
    """The reference for the table above: TRL's own GRPOTrainer with beta > 0 and a peft adapter."""
    from datasets import Dataset
    from trainer_utils import length_reward
    from trl import GRPOConfig, GRPOTrainer

    from arca_lab.config import make_config
    from arca_lab.models import load_policy, lora_config

    cfg = make_config(model=str(tiny_model_dir), rank=4)
    model, tokenizer = load_policy(cfg)
    rows = [{"prompt": "12+34+56="}] * 2
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        beta=0.05,
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
    )
    trainer._backbone = trainer.model.get_base_model().base_model
    counter = _ForwardCounter(trainer, monkeypatch)
    trainer.train()
    assert counter.count == 2


def test_beta_uses_base_pass_as_reference(tiny_model_dir, tmp_path):
    """ref_per_token_logps from the shared base pass equal TRL's own reference computation."""
    trainer, rows = make_trainer(
        tiny_model_dir, tmp_path, credit="arca", beta=0.05, perturb_b=0.3, temperature=0.7
    )
    inputs = one_batch(trainer, rows)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad(), trainer.model.disable_adapter():
        trl_ref, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, inputs["completion_ids"].size(1)
        )
    valid = inputs["completion_mask"].bool()
    torch.testing.assert_close(inputs["ref_per_token_logps"][valid], trl_ref[valid], atol=1e-5, rtol=1e-5)


def test_arca_without_adapter_is_refused(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trainer_utils import length_reward

    from arca_lab.config import make_config
    from arca_lab.models import load_policy
    from arca_lab.run import grpo_args
    from arca_lab.trainer import ArcaGRPOTrainer

    cfg = make_config(model=str(tiny_model_dir), credit="arca", num_generations=2, prompts_per_step=2)
    model, tokenizer = load_policy(cfg)
    with pytest.raises(ValueError, match="peft_config"):
        ArcaGRPOTrainer(
            model=model,
            reward_funcs=length_reward,
            args=grpo_args(cfg, str(tmp_path), False),
            train_dataset=Dataset.from_list([{"prompt": "1+2+3="}] * 2),
            processing_class=tokenizer,
        )


def test_arca_on_all_layers_shares_the_base_pass(tiny_model_dir, tmp_path, monkeypatch):
    """ARCA over every decoder layer: weights differ from last-layer ARCA, still one extra forward."""
    weights = {}
    for layers in ("last", "all"):
        trainer, rows = make_trainer(
            tiny_model_dir,
            tmp_path / layers,
            credit="arca",
            arca_layers=layers,
            layer_aggregate="max",
            perturb_b=0.3,
        )
        inputs = one_batch(trainer, rows)
        trainer.compute_loss(trainer.model, inputs)
        weights[layers] = trainer.last_batch["weights"]
        assert trainer.forward_counts == {"base": 1, "loss": 1, "measure": 0}
    mask = trainer.last_batch["completion_mask"].bool()
    assert not torch.allclose(weights["last"][mask], weights["all"][mask], atol=1e-4)


def test_probe_only_base_pass_covers_one_completion_per_prompt(tiny_model_dir, tmp_path):
    """With uniform credit the base pass runs on every K-th row only; probed rows still equal the exact KL."""
    trainer, rows = make_trainer(tiny_model_dir, tmp_path, credit="uniform", kl_probe=True, perturb_b=0.3)
    inputs = one_batch(trainer, rows)
    K = trainer.num_generations
    expected = torch.zeros(inputs["completion_ids"].size(0), dtype=torch.bool)
    expected[::K] = True
    assert torch.equal(inputs["probe_rows"].cpu(), expected)
    trainer.compute_loss(trainer.model, inputs)
    probe = trainer.last_batch
    assert torch.isnan(probe["kl_policy_ref"][~expected]).all()
    merged = copy.deepcopy(trainer.model).merge_and_unload()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        lp = _completion_logits(merged, inputs).double().log_softmax(-1)[expected]
        lq = _completion_logits(base, inputs).double().log_softmax(-1)[expected]
    mask = inputs["completion_mask"].bool()[expected]
    kl_pq = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(
        probe["kl_policy_ref"][expected][mask].double(), kl_pq[mask], atol=1e-6, rtol=1e-5
    )


def test_credit_and_probe_logits_are_chunked_over_rows(tiny_model_dir, tmp_path, monkeypatch):
    """With a budget of one row's logits, every head projection holds one row, and every logged number equals
    the one-chunk computation: the full-vocabulary pass never holds a batch's logits at once."""
    trainer, rows = make_trainer(tiny_model_dir, tmp_path, credit="divergence", perturb_b=0.05)
    inputs = one_batch(trainer, rows)
    trainer.compute_loss(trainer.model, inputs)
    whole = dict(trainer.last_batch)
    T = inputs["completion_ids"].size(1)
    V = trainer._base_head.weight.size(0)
    monkeypatch.setattr(trainer_module, "LOGITS_CHUNK_ELEMENTS", T * V)  # one row per chunk
    seen: list[int] = []
    projection = trainer._policy_logits
    monkeypatch.setattr(trainer, "_policy_logits", lambda h: seen.append(h.size(0)) or projection(h))
    trainer.compute_loss(trainer.model, inputs)
    B = inputs["completion_ids"].size(0)
    assert (
        seen and max(seen) == 1 and sum(seen) == B
    )  # B projections of one row (the first-batch check is done)
    for k, v in whole.items():
        torch.testing.assert_close(trainer.last_batch[k], v, equal_nan=True, msg=k)
