"""Rollout engines (arca_lab.rollout): the copy follows the trainer's merged LoRA weights, the returned
log-probs are those of the distribution that was sampled, and each engine kind sits where it should relative
to the fp32 floor of the train–inference discrepancy δ_t = |π_train(y_t) − π_engine(y_t)| (arXiv 2606.08779).

Notation: B prompts per batch, T completion tokens, V vocabulary; W0 + s B A the merged LoRA weight; τ the
sampling temperature; σ the relative weight-noise scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from arca_lab.models import lm_head_module_name, lm_head_of
from arca_lab.rollout import (
    ENGINES,
    RolloutEngine,
    check_engine,
    completion_logprobs,
    make_engine,
    merged_weight,
    sample,
)
from arca_lab.testing import make_tiny_causal_lm

PAD, EOS = 0, 1  # the embedded character tokenizer's <pad> and <eos> (the tiny Qwen3 of conftest.py)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Tied head: a LoRA on it must not reach the input embedding of the engine copy."""
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), "llama")


def _policy(model_dir, targets, seed: int = 0) -> nn.Module:
    """LoRA r = 4, s = 2 on `targets` ("all-linear" or ["lm_head"]) with random non-zero B (peft inits B = 0)."""
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if targets == ["lm_head"]:
        targets = [lm_head_module_name(model)]
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _random_b(policy, seed)
    return policy


def _random_b(policy: nn.Module, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = scale * torch.randn(p.shape, generator=g)


def _ids(vocab: int, seed: int, shape=(3, 10)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, shape, generator=g)  # (B, P), no pad or EOS


def _prompts(vocab: int, seed: int, n: int) -> list[list[int]]:
    """`n` prompts of lengths 3..8, so generation left-pads."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (3 + i % 6,), generator=g).tolist() for i in range(n)]


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()  # (B, P, V)


def _model_dir(name: str, tiny_model_dir, gpt2_dir, llama_dir):
    return {"qwen3": tiny_model_dir, "gpt2": gpt2_dir, "llama": llama_dir}[name]


ADAPTERS = [("qwen3", "all-linear"), ("qwen3", ["lm_head"]), ("gpt2", "all-linear"), ("llama", ["lm_head"])]
ADAPTER_IDS = ["qwen3-all-linear", "qwen3-head", "gpt2-conv1d-all-linear", "llama-tied-head"]


# ------------------------------------------------------------------------------------------ input checks
class _Untouchable:
    """A stand-in policy that fails the test if anything reads it: checks must come before model work."""

    def __getattribute__(self, name):
        raise AssertionError(f"the policy was touched ({name}) before the arguments were checked")


@pytest.mark.parametrize(
    ("kind", "noise", "fix"),
    [
        ("vllm", 0.0, "choose one of"),
        ("noise", -0.01, "sigma >= 0"),
        ("noise", math.nan, "sigma >= 0"),
        ("fp32", 0.01, "set engine='noise'"),
        ("noise", 0.0, "needs noise > 0"),
    ],
)
def test_bad_arguments_fail_before_model_work(kind, noise, fix):
    with pytest.raises(ValueError, match=fix):
        check_engine(kind, noise)
    with pytest.raises(ValueError, match=fix):
        make_engine(kind, _Untouchable(), noise=noise)


def test_valid_arguments_pass_and_same_has_no_engine():
    for kind in ENGINES:
        check_engine(kind, 0.05 if kind == "noise" else 0.0)
    assert make_engine("same", _Untouchable()) is None


def test_int8_unsupported_cpu_fails_before_model_work(monkeypatch):
    monkeypatch.setattr(
        type(torch.backends.quantized), "supported_engines", property(lambda self: ["onednn"])
    )
    with pytest.raises(ValueError, match="engine='bf16'"):
        check_engine("int8")
    with pytest.raises(ValueError, match="quantized CPU backend"):
        make_engine("int8", _Untouchable())
    check_engine("bf16")  # the other kinds do not need the backend


# --------------------------------------------------------------------------------- weights follow the policy
@pytest.mark.parametrize(("arch", "targets"), ADAPTERS, ids=ADAPTER_IDS)
def test_fp32_engine_equals_merged_policy(tiny_model_dir, gpt2_dir, llama_dir, arch, targets):
    policy = _policy(_model_dir(arch, tiny_model_dir, gpt2_dir, llama_dir), targets)
    engine = make_engine("fp32", policy)
    ids = _ids(policy.config.vocab_size, seed=1)
    ref = _logits(policy, ids)
    with policy.disable_adapter():
        base = _logits(policy, ids)
    assert (ref - base).abs().max() > 1e-2  # the adapter matters, so a missing merge cannot pass
    assert (_logits(engine.model, ids) - ref).abs().max() <= 1e-5
    assert not any(isinstance(m, LoraLayer) for m in engine.model.modules())  # a plain transformers model
    # The engine's input embedding is the frozen one even when the (tied) head carries a merged LoRA.
    emb = policy.get_base_model().get_input_embeddings().weight
    assert torch.equal(engine.model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize(("arch", "targets"), ADAPTERS, ids=ADAPTER_IDS)
def test_engine_follows_policy_after_sync(tiny_model_dir, gpt2_dir, llama_dir, arch, targets):
    policy = _policy(_model_dir(arch, tiny_model_dir, gpt2_dir, llama_dir), targets)
    engine = make_engine("fp32", policy)
    ids = _ids(policy.config.vocab_size, seed=2)
    _random_b(policy, seed=7)  # a training step
    ref = _logits(policy, ids)
    assert (_logits(engine.model, ids) - ref).abs().max() > 1e-2  # stale until synced
    engine.sync(policy)
    assert (_logits(engine.model, ids) - ref).abs().max() <= 1e-5
    assert engine.syncs == 2 and engine.sync_seconds > 0


def test_bf16_engine_within_bf16_precision(tiny_model_dir):
    policy = _policy(tiny_model_dir, "all-linear")
    engine = make_engine("bf16", policy)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    ids = _ids(policy.config.vocab_size, seed=3)
    ref = _logits(policy, ids)
    err = (_logits(engine.model, ids) - ref).abs().max()
    # bf16 keeps 8 significant bits (unit roundoff 2^-8); a 2-layer forward compounds a few of them.
    assert 1e-4 < err <= 8 * 2**-8 * (1 + ref.abs().max())
    _random_b(policy, seed=10)
    ref = _logits(policy, ids)
    stale = (_logits(engine.model, ids) - ref).abs().max()
    engine.sync(policy)
    assert (_logits(engine.model, ids) - ref).abs().max() <= min(err * 2, stale / 4)  # follows, as precise


def _quantize_dynamic_reference(policy) -> nn.Module:
    """torch's own recipe on the fp32 merged copy: quantize_dynamic, per-channel int8 weights, every Linear."""
    from torch.ao.quantization import quantize_dynamic
    from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

    fp32 = make_engine("fp32", policy).model
    return quantize_dynamic(fp32, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


@pytest.mark.parametrize(("arch", "targets"), ADAPTERS, ids=ADAPTER_IDS)
def test_int8_engine_is_quantize_dynamic_of_the_merged_copy(
    tiny_model_dir, gpt2_dir, llama_dir, arch, targets
):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    policy = _policy(_model_dir(arch, tiny_model_dir, gpt2_dir, llama_dir), targets)
    engine = make_engine("int8", policy)
    assert not any(type(m) in (nn.Linear, Conv1D) for m in engine.model.modules())  # GPT-2's Conv1D too
    assert isinstance(lm_head_of(engine.model), DynamicQuantizedLinear)
    ids = _ids(policy.config.vocab_size, seed=4)
    _random_b(policy, seed=8)  # a training step, then a sync re-quantises in place
    ref = _logits(policy, ids)
    stale = (_logits(engine.model, ids) - ref).abs().max()
    engine.sync(policy)
    got = _logits(engine.model, ids)
    assert (got - ref).abs().max() < 0.5 * stale
    if arch != "gpt2":  # quantize_dynamic leaves Conv1D in float: no reference for GPT-2
        assert torch.equal(got, _logits(_quantize_dynamic_reference(policy), ids))
    assert 1e-4 < (got - ref).abs().max() < 0.1 * (1 + ref.abs().max())  # int8 error, no more


def test_noise_is_relative_on_matrices_only_and_seeded(tiny_model_dir):
    sigma = 0.05
    policy = _policy(tiny_model_dir, "all-linear")
    engine = make_engine("noise", policy, noise=sigma, seed=3)
    _random_b(policy, seed=9)  # a training step: the next sync must perturb the new merged weights
    engine.sync(policy)
    base = policy.get_base_model()
    sources = dict(base.named_modules())
    for name, m in engine.model.named_modules():
        if isinstance(m, nn.Linear):
            w = merged_weight(sources[name])
            ratio = m.weight / w - 1  # ε σ elementwise for W ← W ⊙ (1 + σ ε)
            assert abs(ratio.std().item() / sigma - 1) < 0.2, name
            assert abs(ratio.mean().item()) < 0.3 * sigma, name
    for name, p in engine.model.named_parameters():  # norms and embeddings are untouched
        if "norm" in name or "embed" in name:
            assert torch.equal(p, base.get_parameter(name)), name
    # ε depends on (seed, sync count) only: a twin synced as often matches, another seed or sync does not.
    twin = make_engine("noise", policy, noise=sigma, seed=3)
    other = make_engine("noise", policy, noise=sigma, seed=4)
    twin.sync(policy)
    other.sync(policy)
    head = lm_head_of(engine.model).weight
    assert torch.equal(lm_head_of(twin.model).weight, head)
    assert not torch.equal(lm_head_of(other.model).weight, head)
    twin.sync(policy)
    assert not torch.equal(lm_head_of(twin.model).weight, head)


def test_engines_leave_the_global_rng_alone(tiny_model_dir):
    policy = _policy(tiny_model_dir, "all-linear")
    state = torch.get_rng_state()
    engine = make_engine("noise", policy, noise=0.01)
    engine.sync(policy)
    first = engine.generate(
        _prompts(policy.config.vocab_size, 0, 4),
        **dict(pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=6, temperature=1.0, top_p=1.0, seed=5),
    )
    assert torch.equal(torch.get_rng_state(), state)
    again = engine.generate(
        _prompts(policy.config.vocab_size, 0, 4),
        **dict(pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=6, temperature=1.0, top_p=1.0, seed=5),
    )
    assert first == again


def test_fp32_engine_samples_what_the_trainer_would(tiny_model_dir):
    """Policy as the trainer holds it (train mode, gradient checkpointing, TRL's input-require-grads hook); from
    the same global RNG state the fp32 engine (seed=None) draws the same tokens as TRL's HF path
    (`policy.generate` with TRL's sampling flags, completions cut after the first EOS)."""
    policy = _policy(tiny_model_dir, "all-linear")
    policy.train()
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    policy.enable_input_require_grads()
    engine = make_engine("fp32", policy)
    prompts = [p for p in _prompts(policy.config.vocab_size, 5, 8) for _ in range(4)]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])  # (B, P), left-padded
    mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()  # (B, P)
    torch.manual_seed(11)
    with torch.no_grad():
        policy.eval()  # the trainer samples without dropout
        out = policy.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=10, temperature=1.0, top_p=1.0,
            top_k=0, pad_token_id=PAD, eos_token_id=[EOS],
        )[:, P:]  # fmt: skip
    trl = [row[: row.index(EOS) + 1] if EOS in row else row for row in out.tolist()]
    torch.manual_seed(11)
    got, _ = engine.generate(
        prompts, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=10, temperature=1.0, top_p=1.0
    )
    assert got == trl


# ----------------------------------------------------------------------------------------- sampled log-probs
def _hand_logp_entropy(model, prompt: list[int], completion: list[int], tau: float, top_p: float):
    """log p_t(y_t) and H(p_t) by hand: one unpadded forward; p_t = softmax(z_t / τ) restricted to the top-p
    nucleus (tokens whose higher-ranked mass is < top_p, HF's TopPLogitsWarper) and renormalised."""
    ids = torch.tensor([prompt + completion])
    z = _logits(model, ids)[0, len(prompt) - 1 : -1] / tau  # (T, V)
    p = torch.softmax(z.double(), dim=-1)
    sorted_p, order = p.sort(dim=-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    q = torch.where(keep, p, 0.0)
    q = q / q.sum(-1, keepdim=True)
    y = torch.tensor(completion)[:, None]
    entropy = -(torch.where(q > 0, q * q.log(), 0.0)).sum(-1)
    return q.gather(1, y).log().squeeze(1), entropy


@pytest.mark.parametrize(
    ("arch", "kind", "noise", "top_p"),
    [
        ("qwen3", "fp32", 0.0, 1.0),
        ("qwen3", "noise", 0.1, 1.0),
        ("qwen3", "fp32", 0.0, 0.7),
        ("llama", "fp32", 0.0, 1.0),  # V = 512 > 50: HF's default top_k = 50 must not sneak in
    ],
)
def test_logprobs_are_those_of_the_sampled_distribution(tiny_model_dir, llama_dir, arch, kind, noise, top_p):
    tau = 0.7  # ≠ 1, so log-probs of the raw logits would be caught
    policy = _policy(tiny_model_dir if arch == "qwen3" else llama_dir, "all-linear")
    engine = make_engine(kind, policy, noise=noise)
    prompts = _prompts(policy.config.vocab_size, 1, 6)
    completions, logprobs = engine.generate(
        prompts, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=8, temperature=tau, top_p=top_p, seed=0
    )
    assert sum(len(c) for c in completions) > 20
    for prompt, comp, lp, ent in zip(prompts, completions, logprobs, engine.last_entropies, strict=True):
        assert len(comp) == len(lp) == len(ent)
        want_lp, want_ent = _hand_logp_entropy(engine.model, prompt, comp, tau, top_p)
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), want_lp, atol=2e-5), (lp, want_lp)
        assert torch.allclose(torch.tensor(ent, dtype=torch.float64), want_ent, atol=2e-5)
    assert engine.generate_seconds > 0


def test_completions_stop_after_first_eos_inclusive(tiny_model_dir):
    policy = _policy(tiny_model_dir, "all-linear")
    engine = make_engine("fp32", policy)
    vocab = policy.config.vocab_size
    eos = list(range(2, vocab, 3))  # a third of the vocabulary ends a completion: most stop early
    n = 7
    completions, logprobs = engine.generate(
        _prompts(vocab, 2, 16), pad_token_id=PAD, eos_token_ids=eos, max_new_tokens=n, temperature=1.0,
        top_p=1.0, seed=1,
    )  # fmt: skip
    ended = 0
    for comp, lp in zip(completions, logprobs, strict=True):
        hits = [i for i, t in enumerate(comp) if t in eos]
        assert hits in ([], [len(comp) - 1]), comp  # at most one EOS, and it is the last token kept
        assert hits or len(comp) == n
        assert len(lp) == len(comp)
        ended += bool(hits)
    assert 0 < ended < len(completions)


def test_helpers_score_without_dropout_and_restore_train_mode(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear")
    )
    _random_b(policy, 0)
    prompts = _prompts(policy.config.vocab_size, 6, 4)
    comps = [[3, 4, 5, EOS]] * 4
    policy.eval()
    want = completion_logprobs(policy, prompts, comps, pad_token_id=PAD)
    policy.train()  # as the trainer holds it between steps
    assert completion_logprobs(policy, prompts, comps, pad_token_id=PAD) == want
    torch.manual_seed(1)
    _, lp, _ = sample(
        policy, prompts, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=5, temperature=1.0, top_p=1.0
    )
    torch.manual_seed(1)
    _, lp_engine = make_engine("fp32", policy).generate(
        prompts, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=5, temperature=1.0, top_p=1.0
    )
    flat = [
        x for row in lp for x in row
    ]  # the trainer's policy sampled without dropout: the engine's numbers
    assert torch.allclose(torch.tensor(flat), torch.tensor([x for row in lp_engine for x in row]), atol=1e-5)
    assert all(m.training for m in policy.modules())


# --------------------------------------------------------------------------------------- discrepancy δ
def _delta(policy, engine, prompts, tau: float = 1.0, seed: int = 0) -> torch.Tensor:
    """δ_t = |exp(logp_train) − exp(logp_engine)| over every sampled token (train: the peft policy, fp32)."""
    comps, lp_engine = engine.generate(
        prompts,
        pad_token_id=PAD,
        eos_token_ids=[EOS],
        max_new_tokens=12,
        temperature=tau,
        top_p=1.0,
        seed=seed,
    )
    lp_train = completion_logprobs(policy, prompts, comps, pad_token_id=PAD, temperature=tau)
    a = torch.tensor([x for row in lp_train for x in row], dtype=torch.float64)
    b = torch.tensor([x for row in lp_engine for x in row], dtype=torch.float64)
    return (a.exp() - b.exp()).abs()


def test_discrepancy_floor_and_engine_kinds(tiny_model_dir):
    # Measured here (24 prompts, ~240 tokens, V = 17, near-uniform random model): fp32 mean 5e-9, max 3e-8;
    # mean bf16 6.6e-5, int8 3.4e-4, noise σ = 0.03 6.0e-4.
    policy = _policy(tiny_model_dir, "all-linear")
    prompts = _prompts(policy.config.vocab_size, 3, 24)
    floor = _delta(policy, make_engine("fp32", policy), prompts)
    assert floor.numel() > 100 and floor.max() <= 1e-5
    for kind, noise in [("bf16", 0.0), ("int8", 0.0), ("noise", 0.03)]:
        delta = _delta(policy, make_engine(kind, policy, noise=noise), prompts)
        # clearly off the floor: three orders of magnitude above its mean and above its 1e-5 bound
        assert delta.mean() > max(1000 * floor.mean(), 2e-5), (kind, delta.mean(), floor.mean())


def test_discrepancy_grows_with_sigma(tiny_model_dir):
    policy = _policy(tiny_model_dir, "all-linear")
    prompts = _prompts(policy.config.vocab_size, 4, 24)
    means = [
        _delta(policy, make_engine("noise", policy, noise=s, seed=0), prompts).mean().item()
        for s in (0.01, 0.03, 0.1)
    ]
    assert means[0] < means[1] < means[2], means
    # measured 2.7e-4, 7.9e-4, 2.4e-3: about linear in σ (first order in the weight perturbation)
    assert means[2] > 3 * means[0], means


def test_engine_is_a_rollout_engine(tiny_model_dir):
    policy = _policy(tiny_model_dir, ["lm_head"])
    engine = make_engine("bf16", policy)
    assert isinstance(engine, RolloutEngine) and "bf16" in repr(engine)
    with pytest.raises(ValueError, match="make_engine"):
        RolloutEngine("same", policy)
