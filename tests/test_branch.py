"""arca_branch (arca_lab.branch): writers found structurally, the first-order estimate against an exact base
forward, what it neglects, and the norm gain. Derivation: theory/arca_branch.md."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from arca_lab.branch import BranchStore, branch_capture, find_residual_writers, first_order_residual
from arca_lab.models import backbone_of
from arca_lab.testing import make_tiny_causal_lm

T = 6  # completion positions scored; sequences are P + T = 12 tokens


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


def _policy(model_dir, targets, layers=None, dtype=torch.float64, fan_in_fan_out=False):
    """LoRA r = 4, s = 2 on `targets` (optionally only in decoder layers `layers`); B = 0 as peft inits it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers, fan_in_fan_out=fan_in_fan_out
    )
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    return get_peft_model(model, config)


def _random_b(policy, seed: int, only: str | None = None) -> dict[str, torch.Tensor]:
    """Random LoRA B (the adapter is the identity at B = 0); returns the draws so tests can rescale them."""
    g = torch.Generator().manual_seed(seed)
    draws = {}
    for name, p in policy.named_parameters():
        if "lora_B" in name and (only is None or only in name):
            draws[name] = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.data = draws[name].clone()
    return draws


def _random_gain(writers, seed: int) -> None:
    """A non-uniform final-norm gain in [0.5, 1.5) (random init leaves it at 1, which hides a dropped g)."""
    g = torch.Generator().manual_seed(seed)
    w = writers.norm.weight
    w.data = 0.5 + torch.rand(w.shape, generator=g, dtype=w.dtype)


def _ids(policy, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, policy.config.vocab_size, (2, 2 * T), generator=g)  # (B, P + T)


@torch.no_grad()
def _estimate_and_exact(policy, writers, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(first_order_residual, exact ARCA ‖h^adapted − h^base‖ with a base forward), both (B, T)."""
    backbone = backbone_of(policy)
    with branch_capture(policy, writers) as store:
        h = backbone(input_ids=ids).last_hidden_state  # (B, P + T, d), the input of lm_head
        estimate = first_order_residual(store, T)
    with policy.disable_adapter():
        h_base = backbone(input_ids=ids).last_hidden_state
    exact = (h - h_base)[:, -T - 1 : -1].float().norm(dim=-1)
    return estimate, exact


# ------------------------------------------------------------------------------------ finding the writers
@pytest.mark.parametrize(
    ("arch", "targets", "suffixes", "centered"),
    [
        ("qwen3", "all-linear", ("self_attn.o_proj", "mlp.down_proj"), False),
        ("gpt2", ["c_attn", "c_proj", "c_fc"], ("attn.c_proj", "mlp.c_proj"), True),
    ],
)
def test_writers_are_found_structurally(tiny_model_dir, gpt2_dir, arch, targets, suffixes, centered):
    # The tiny Qwen3 has q/k/v of width d = 32 too, so the width alone cannot tell the writers apart.
    policy = _policy(tiny_model_dir if arch == "qwen3" else gpt2_dir, targets, fan_in_fan_out=arch == "gpt2")
    writers = find_residual_writers(policy)
    n_layers = policy.config.num_hidden_layers
    assert len(writers.names) == len(writers.lora) == 2 * n_layers
    assert sorted(n.split(".", 2)[-1] for n in writers.names) == sorted(suffixes * n_layers)
    assert writers.centered is centered  # RMSNorm vs GPT-2's LayerNorm
    assert policy.training  # the probe's eval() is undone


def test_post_norm_blocks_and_adapters_without_writers_are_refused(tiny_model_dir, tmp_path):
    bert = make_tiny_causal_lm(tmp_path / "bert", "bert")  # post-norm: LayerNorm after each residual add
    with pytest.raises(ValueError, match=r"not a pre-norm residual block.*credit='arca'"):
        find_residual_writers(_policy(bert, "all-linear"))
    with pytest.raises(ValueError, match="add down_proj,o_proj to target_modules"):
        find_residual_writers(_policy(tiny_model_dir, ["q_proj", "v_proj"]))


# ------------------------------------------------------------------------------------ the estimate
@pytest.mark.parametrize(("arch", "target"), [("qwen3", "down_proj"), ("gpt2", "mlp.c_proj")])
def test_estimate_tends_to_exact_arca_as_the_adapter_shrinks(tiny_model_dir, gpt2_dir, arch, target):
    """Only the last block's last writer is adapted: its input does not depend on the adapter, so the residual
    change is exactly D and the only error is the norm's second order (theory/arca_branch.md §1, §2): the
    relative error falls linearly with the scale of B."""
    model_dir = tiny_model_dir if arch == "qwen3" else gpt2_dir
    last = AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers - 1
    policy = _policy(model_dir, [target], layers=[last], fan_in_fan_out=arch == "gpt2")
    writers = find_residual_writers(policy)
    _random_gain(writers, seed=2)
    draws = _random_b(policy, seed=1)
    ids = _ids(policy, seed=3)
    errors = []
    for scale in (1e-1, 1e-2, 1e-3):  # smaller scales hit the fp32 arithmetic inside the models' norms
        for name, p in policy.named_parameters():
            if name in draws:
                p.data = scale * draws[name]
        estimate, exact = _estimate_and_exact(policy, writers, ids)
        assert exact.min() > 0
        errors.append(float((estimate / exact - 1).abs().max()))
    assert errors[-1] < 5e-3, errors  # small at 1e-3 (the value depends on the seeded A and B: ~2e-3)
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors  # ~linear in the scale


def test_non_writer_branches_and_propagation_are_neglected(tiny_model_dir):
    """Known first-order limitation (theory/arca_branch.md §1): what the adapter changes *before* a writer is
    not in D. (a) Only a q_proj branch is non-zero: the estimate is exactly 0 while exact ARCA is not. (b) All
    writers adapted: early writes propagate through later blocks, so the estimate/exact ratio does not tend
    to 1 as the adapter shrinks."""
    policy = _policy(tiny_model_dir, ["q_proj", "o_proj"])
    writers = find_residual_writers(policy)
    _random_b(policy, seed=1, only="q_proj")  # o_proj's B stays 0
    estimate, exact = _estimate_and_exact(policy, writers, _ids(policy, seed=3))
    assert torch.equal(estimate, torch.zeros_like(estimate))
    assert exact.max() > 1e-3

    policy = _policy(tiny_model_dir, ["o_proj", "down_proj"])
    writers = find_residual_writers(policy)
    draws = _random_b(policy, seed=1)
    for name, p in policy.named_parameters():
        if name in draws:
            p.data = 1e-3 * draws[name]
    estimate, exact = _estimate_and_exact(policy, writers, _ids(policy, seed=3))
    assert float((estimate / exact - 1).abs().max()) > 0.02


def test_the_final_norm_gain_is_applied(tiny_model_dir):
    policy = _policy(tiny_model_dir, "all-linear")
    writers = find_residual_writers(policy)
    _random_b(policy, seed=1)
    ids = _ids(policy, seed=3)
    estimate, exact = _estimate_and_exact(policy, writers, ids)
    writers.norm.weight.data *= 2
    estimate2, exact2 = _estimate_and_exact(policy, writers, ids)
    assert estimate.min() > 0
    torch.testing.assert_close(exact2, 2 * exact)  # h = g ⊙ normalize(u): exact ARCA is linear in g
    torch.testing.assert_close(estimate2, 2 * estimate)


def test_the_accumulator_is_the_vector_sum_of_the_writer_branches(tiny_model_dir):
    """D = Σ_writers s·B A x as vectors (fp32, (B, S, d)), q/k/v/gate/up branches left out; a fresh forward
    starts a fresh sum; a disabled adapter scores 0."""
    policy = _policy(tiny_model_dir, "all-linear", dtype=torch.float32)
    writers = find_residual_writers(policy)
    _random_b(policy, seed=1)
    branches: dict[str, torch.Tensor] = {}
    hooks = [
        module.lora_B["default"].register_forward_hook(
            lambda m, a, o, name=name, module=module: branches.__setitem__(
                name, o * module.scaling["default"]
            )
        )
        for name, module in backbone_of(policy).named_modules()
        if hasattr(module, "lora_B")
    ]
    ids = _ids(policy, seed=3)
    with torch.no_grad(), branch_capture(policy, writers) as store:
        for _ in range(2):  # the second forward must not add onto the first
            backbone_of(policy)(input_ids=ids)
        expected = sum(b for n, b in branches.items() if n.endswith(("o_proj", "down_proj")))
        assert store.D.dtype == torch.float32 and store.D.shape == (*ids.shape, 32)
        torch.testing.assert_close(store.D, expected)
        with policy.disable_adapter():
            backbone_of(policy)(input_ids=ids)
        assert torch.equal(first_order_residual(store, T), torch.zeros(2, T))
    for h in hooks:
        h.remove()
    with pytest.raises(RuntimeError, match="no forward ran the final norm"):
        first_order_residual(BranchStore(writers), T)
