"""The KL-law prediction test: its registration, the held-out KL measurement and the registered pass rules."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from arca_lab.analysis import prediction as pr
from arca_lab.analysis import prediction_criteria as pc
from arca_lab.analysis.heldout_contexts import build_context_set, kl_pair64, measure_adapter
from arca_lab.sweep.grid import get_preset
from arca_lab.sweep.studies import preregistration
from theory.kl_law import CONSTANTS


# ---------------------------------------------------------------------------------------------- registration
@pytest.fixture(scope="module")
def reg() -> dict:
    return preregistration(pr.NAME)


def test_registration_predictions_equal_predict_kl(reg):
    assert reg["constants"] == CONSTANTS
    assert pr.registration_mismatches(reg) == []


def test_registration_check_fails_on_a_changed_prediction(reg):
    shifted = copy.deepcopy(reg)
    shifted["points"][7]["predicted"]["kl_ref_theta"] *= 1.01
    assert len(pr.registration_mismatches(shifted)) == 1
    moved = copy.deepcopy(reg)
    moved["points"][0]["inputs"]["inputs"]["lr"] *= 2  # the inputs no longer give the committed values
    assert pr.registration_mismatches(moved)


def test_registration_grid_and_rules(reg):
    regimes = [p["regime"] for p in reg["points"]]
    assert len(regimes) <= 32 and all(regimes.count(g) >= 4 for g in pc.REGIMES)
    assert {(p["rank"], p["lr"]) for p in reg["points"]} == {(r, lr) for r in pr.RANKS for lr in pr.LRS}
    assert reg["criteria"] == pr.CRITERIA and len(reg["setup"]["seeds"]) >= 10
    assert all(p["inputs"]["inputs"]["steps"] == pr.STEPS for p in reg["points"])


def test_prediction_presets_follow_the_registration(reg):
    full, quick = get_preset("prediction"), get_preset("prediction-quick")
    head, carry = full.subgrids
    assert head["rank"] == tuple(reg["setup"]["ranks"]) and head["lr"] == tuple(reg["setup"]["lrs"])
    assert head["seed"] == tuple(reg["setup"]["seeds"]) and head["arm"] == ("head",)
    assert carry["arm"] == ("all",) and len(quick.subgrids) == 1 and len(quick.subgrids[0]["seed"]) == 2
    assert full.shared["save_every"] == 3 and full.shared["eval_prompts"] == 0 and full.extra_axes == ("lr",)


# ---------------------------------------------------------------------------------------------- measurement
def test_kl_pair64_by_hand():
    # π_ref = (½, ½); logits of π_θ = (log 3, 0) → π_θ = (¾, ¼)
    # KL(π_ref‖π_θ) = ½ log(½/¾) + ½ log(½/¼) = ½ log(4/3);  KL(π_θ‖π_ref) = ¾ log(3/2) + ¼ log(1/2)
    fwd, bwd = kl_pair64(np.zeros((1, 2)), np.array([[math.log(3), 0.0]]))
    assert fwd == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)
    assert bwd == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-14)


@pytest.fixture(scope="module")
def tiny_context(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, build_context_set(model, tok, ["1+2=", "12+3=", "7*8="], max_new_tokens=5)


def _saved_adapter(model_dir, out, targets, seed: int, b_scale: float = 0.3):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    policy = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = b_scale * torch.randn(p.shape, generator=g)
    policy.save_pretrained(out, save_embedding_layers=False)
    return policy


def test_head_only_measurement_equals_the_adapted_forward(tiny_model_dir, tiny_context, tmp_path):
    model, ctx = tiny_context
    policy = _saved_adapter(tiny_model_dir, tmp_path / "a", ["lm_head"], seed=1).eval()
    fast = measure_adapter(ctx, tmp_path / "a", 1.0)
    forward = measure_adapter(ctx, tmp_path / "a", 1.0, base_model=model)  # runs peft's forward for x_θ
    assert fast[0] > 1e-4 and fast == pytest.approx(forward, rel=1e-12)
    # against the peft model's own float32 logits at the same rows
    with torch.no_grad():
        logits = policy(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask).logits[ctx.rows].double()
    ref = torch.from_numpy(ctx.x @ ctx.w0.T)
    assert fast == pytest.approx(kl_pair64(ref.numpy(), logits.numpy()), rel=1e-4)
    assert measure_adapter(ctx, tmp_path / "a", 2.0)[0] < fast[0]  # τ = 2 halves the logit shift


def test_all_linear_measurement_runs_the_forward(tiny_model_dir, tiny_context, tmp_path):
    model, ctx = tiny_context
    policy = _saved_adapter(tiny_model_dir, tmp_path / "b", "all-linear", seed=2).eval()
    with pytest.raises(ValueError, match="pass base_model"):
        measure_adapter(ctx, tmp_path / "b", 1.0)
    got = measure_adapter(ctx, tmp_path / "b", 1.0, base_model=model)
    with torch.no_grad():
        logits = policy(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask).logits[ctx.rows].double()
    assert got[0] > 1e-6 and got == pytest.approx(kl_pair64(ctx.x @ ctx.w0.T, logits.numpy()), rel=1e-4)
    assert not any("lora" in n for n, _ in model.named_modules())  # the base model is left unwrapped


# ---------------------------------------------------------------------------------------------- pass rules
def _fake(
    reg: dict, factor, seeds=(200, 201, 202, 203), noise: float = 0.0, slope: float = 0.0
) -> xr.Dataset:
    """prediction.nc-shaped data: measured = predicted · factor · r^slope · exp(noise · N(0, 1)) per seed."""
    ranks, lrs, steps = list(pr.RANKS), list(pr.LRS), [3, 6, 9, 12]
    rng = np.random.default_rng(0)
    kl = np.full((2, len(ranks), len(lrs), len(seeds), len(steps)), np.nan)
    pred = np.zeros((len(ranks), len(lrs), len(steps)))
    for p in reg["points"]:
        i, j = ranks.index(p["rank"]), lrs.index(p["lr"])
        pred[i, j, :] = p["predicted"]["kl_ref_theta"]
        kl[0, i, j, :, -1] = (
            p["predicted"]["kl_ref_theta"]
            * factor
            * p["rank"] ** slope
            * np.exp(noise * rng.normal(size=len(seeds)))
        )
    dims = ("arm", "rank", "lr", "seed", "step")
    return xr.Dataset(
        {
            "kl_ref_theta": (dims, kl),
            "predicted_kl_ref_theta": (("rank", "lr", "step"), pred),
            "reward_late": (dims[:4], np.zeros(kl.shape[:4])),
        },
        coords={"arm": ["head", "all"], "rank": ranks, "lr": lrs, "seed": list(seeds), "step": steps},
        attrs={"registration": json.dumps(reg)},
    )


def test_median_rule_passes_within_2x_and_fails_at_3x(reg):
    ok = pc.evaluate(_fake(reg, 1.5))
    assert ok["median_err"] == pytest.approx(math.log10(1.5)) and ok["median_pass"]
    bad = pc.evaluate(_fake(reg, 3.0))
    assert bad["median_err"] == pytest.approx(math.log10(3.0)) and not bad["median_pass"]
    assert "FAIL" in pc.format_summary(bad)
    # mixed errors: 13 of 25 points at 1.5x and 12 at 100x; the median is the 13th smallest, log10 1.5, so the
    # rule passes, where a mean (0.09 + 0.96 ~ 1.05 dex) or a max (2 dex) would fail
    ds = _fake(reg, 1.5)
    for p in reg["points"][:12]:
        ds["kl_ref_theta"].loc[dict(arm="head", rank=p["rank"], lr=p["lr"], step=12)] *= 100 / 1.5
    mixed = pc.evaluate(ds)
    assert mixed["median_err"] == pytest.approx(math.log10(1.5)) and mixed["median_pass"]
    assert sum(not r["pass"] for r in mixed["rows"]) == 12


def test_baseline_rule_by_hand(reg):
    # measured ∝ r at every lr: the geometric mean over r = 1, 2, 4, 8, 16 is 4, so the baseline's errors are
    # |log10(r/4)| = 0.602, 0.301, 0, 0.301, 0.602 at each lr: median 0.301. A law off by 1.5x everywhere has
    # 0.176 < 0.301 − 0.1, so it passes; the law's shape is what is measured here (γ rule: slope 1 vs predicted)
    ds = _fake(reg, 1.0)
    for p in reg["points"]:
        ds["kl_ref_theta"].loc[dict(arm="head", rank=p["rank"], lr=p["lr"], step=12)] = 1e-3 * p["rank"]
    res = pc.evaluate(ds)
    assert res["median_err_baseline"] == pytest.approx(math.log10(2), abs=1e-12)
    # a law off by 1.5x everywhere on the same data: median log10 1.5 = 0.176 <= 0.301 - 0.1, so it beats the baseline
    off = copy.deepcopy(reg)
    for p in off["points"]:
        p["predicted"]["kl_ref_theta"] = 1.5e-3 * p["rank"]
    assert pc.evaluate(ds, off)["baseline_pass"]
    for p in off["points"]:  # off by 1.7x: 0.230 > 0.201, it no longer clears the 0.1 dex margin
        p["predicted"]["kl_ref_theta"] = 1.7e-3 * p["rank"]
    assert not pc.evaluate(ds, off)["baseline_pass"]
    perfect = pc.evaluate(_fake(reg, 1.0))
    assert perfect["baseline_pass"] and perfect["median_err"] == pytest.approx(0, abs=1e-12)
    blind_reg = copy.deepcopy(reg)  # a "law" that is the baseline itself cannot beat it by 0.1 dex
    for p in blind_reg["points"]:
        same = [q["predicted"]["kl_ref_theta"] for q in reg["points"] if q["lr"] == p["lr"]]
        p["predicted"]["kl_ref_theta"] = float(np.exp(np.mean(np.log(same))))
    assert not pc.evaluate(_fake(reg, 1.0), blind_reg)["baseline_pass"]


def test_gamma_rule_pass_miss_inconclusive(reg):
    assert all(g["verdict"] == "pass" for g in pc.evaluate(_fake(reg, 1.3, noise=0.05))["gamma"].values())
    tilted = pc.evaluate(_fake(reg, 1.0, noise=0.05, slope=0.5))["gamma"]  # measured γ = predicted + 0.5
    assert all(
        g["verdict"] == "miss" and g["diff_mean"] == pytest.approx(0.5, abs=0.1) for g in tilted.values()
    )
    noisy = pc.evaluate(_fake(reg, 1.0, noise=2.0))["gamma"]  # interval wider than 0.5
    assert all(g["verdict"] == "inconclusive" for g in noisy.values())


def test_nan_measurement_fails(reg):
    ds = _fake(reg, 1.0)
    ds["kl_ref_theta"].loc[dict(arm="head", rank=4, lr=pr.LRS[0], seed=201, step=12)] = np.nan
    res = pc.evaluate(ds)
    row = next(r for r in res["rows"] if r["rank"] == 4 and r["lr"] == pr.LRS[0])
    assert not row["pass"] and math.isinf(row["err"])
    # the other ranks at that lr keep a finite baseline (a NaN point fails alone)
    same_lr = [r for r in res["rows"] if r["lr"] == pr.LRS[0] and r["rank"] != 4]
    assert all(math.isfinite(r["err_baseline"]) for r in same_lr)
    assert pc.evaluate(ds)["gamma"]["small_step"]["verdict"] == "miss"


def test_gamma_interval_uses_student_t(reg):
    # 4 seeds: the 90% interval is mean ± t_{0.95, 3} s/√4 with t_{0.95, 3} = 2.3534
    res = pc.gamma_result(_fake(reg, 1.0, noise=0.05), reg, "small_step")
    lo, hi = res["interval"]
    ds = _fake(reg, 1.0, noise=0.05)
    d = []
    for s in ds.seed.values:
        per_lr = []
        for lr in res["lrs"]:
            pts = [p for p in reg["points"] if p["lr"] == lr and p["regime"] == "small_step"]
            x = np.log10([p["rank"] for p in pts])
            y = np.log10(
                [
                    float(ds["kl_ref_theta"].sel(arm="head", rank=p["rank"], lr=lr, seed=s, step=12))
                    for p in pts
                ]
            )
            yp = np.log10([p["predicted"]["kl_ref_theta"] for p in pts])
            per_lr.append(np.polyfit(x, y, 1)[0] - np.polyfit(x, yp, 1)[0])
        d.append(np.mean(per_lr))
    assert (hi - lo) / 2 == pytest.approx(2.353363 * np.std(d, ddof=1) / 2, rel=1e-5)


def test_measure_sweep_reads_every_checkpoint_on_the_fixed_rows(reg, tiny_model_dir, tiny_context, tmp_path):
    _, ctx = tiny_context
    run = tmp_path / "sweep" / "runs" / "r2-head"
    steps = [3, 6, 9, 12]
    for k, step in enumerate(steps):  # a different random adapter at each saved step
        where = run / "adapter" if step == 12 else run / "checkpoints" / f"step-{step:05d}"
        _saved_adapter(tiny_model_dir, where, ["lm_head"], seed=10 + k, b_scale=0.1 * (k + 1))
    cfg = {
        "target_modules": "lm_head",
        "rank": 2,
        "lr": pr.LRS[1],
        "seed": 200,
        "steps": 12,
        "temperature": 1.0,
    }
    (run / "config.json").write_text(json.dumps(cfg))
    reward = np.arange(1, 13) / 12  # steps 7..12: mean (7 + ... + 12) / 6 / 12 = 9.5 / 12
    xr.Dataset({"reward": ("step", reward)}, coords={"step": np.arange(1, 13)}).to_netcdf(
        run / "run.nc", engine="h5netcdf"
    )
    mine = dict(reg, contexts=pr.context_stats(ctx))
    ds = pr.measure_sweep(tmp_path / "sweep", mine, ctx=ctx)
    got = ds["kl_ref_theta"].sel(arm="head", rank=2, lr=pr.LRS[1], seed=200).values
    for k, step in enumerate(steps):
        where = run / "adapter" if step == 12 else run / "checkpoints" / f"step-{step:05d}"
        assert got[k] == measure_adapter(ctx, where, 1.0)[0]
    assert got[0] < got[1] < got[2] < got[3]  # B grows with k
    assert float(ds["reward_late"].sel(arm="head", rank=2, lr=pr.LRS[1], seed=200)) == pytest.approx(9.5 / 12)
    assert ds["kl_ref_theta"].sel(arm="head", rank=4).isnull().all()  # runs not in the sweep stay NaN
    wrong = dict(reg, contexts=dict(mine["contexts"], rms_radius=mine["contexts"]["rms_radius"] * 1.01))
    with pytest.raises(ValueError, match="re-register"):
        pr.measure_sweep(tmp_path / "sweep", wrong, ctx=ctx)


def test_floor_exclusion_and_missing_seeds_are_reported(reg):
    low = copy.deepcopy(reg)
    low["points"][0]["predicted"]["kl_ref_theta"] = 5e-13  # below 10 x floor (1e-12): excluded, as registered
    res = pc.evaluate(_fake(low, 1.0), low)
    assert res["excluded"] == [(low["points"][0]["rank"], low["points"][0]["lr"])]
    assert "excluded" in pc.format_summary(res)
    text = pc.format_summary(pc.evaluate(_fake(reg, 1.0)))  # 4 of the 10 registered seeds
    assert "INCOMPLETE: 4 of the 10 registered seeds" in text
    full = pc.evaluate(_fake(reg, 1.0, seeds=tuple(reg["setup"]["seeds"])))
    assert full["missing_seeds"] == [] and "INCOMPLETE" not in pc.format_summary(full)


def test_head_delta_reads_rslora_scale(tiny_model_dir, tmp_path):
    from arca_lab.analysis.heldout_contexts import head_delta

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], use_rslora=True))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    policy.save_pretrained(tmp_path / "rs", save_embedding_layers=False)
    head = policy.base_model.model.lm_head
    B, A = (m["default"].weight.detach().double().numpy() for m in (head.lora_B, head.lora_A))
    np.testing.assert_allclose(
        head_delta(tmp_path / "rs"), 8 / math.sqrt(4) * B @ A, rtol=1e-12
    )  # α/√r, not α/r
