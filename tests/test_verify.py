"""`arca-lab verify-bound`: bounds hold on trained tiny adapters, fail with halved inputs, and the measured KLs
are the theory's exact per-token KLs recomputed independently (theory.softmax_kl / theory.aposteriori in numpy).

A tiny sweep (two head-only runs at temperature 1, one all-linear run at temperature 0.7, so two temperatures are
measured) is trained once per test session into one sweep directory (`build_tiny_sweep`, shared with
tests/test_analysis_notebook.py).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from arca_lab.analysis import verify
from arca_lab.analysis.heldout_kl import effective_gain, final_norm
from arca_lab.analysis.verify import (
    BoundRow,
    _Rows,
    apriori_inputs,
    check_summary,
    find_runs,
    main,
    verify_run,
)
from arca_lab.config import HF_LR_SCHEDULERS as SCHEDULES
from arca_lab.config import make_config
from arca_lab.exit_codes import EX_USAGE
from arca_lab.results import load_run
from arca_lab.run import grpo_args, train
from arca_lab.testing import make_tiny_causal_lm
from theory.aposteriori import credit_link_bound, per_token_kl_bound
from theory.apriori import lora_scale
from theory.softmax_kl import kl_ref_theta, kl_theta_ref

TINY = dict(
    steps=2, prompts_per_step=2, num_generations=2, max_completion_length=12, eval_prompts=4, pass_k=2
)
SWEEP_RUNS = {  # run_id (arca_lab.sweep.grid.run_id) -> RunConfig overrides
    "r1-uniform-s0-head-a2r": dict(rank=1, target_modules="lm_head", credit="uniform"),
    "r2-uniform-s0-head-a2r": dict(rank=2, target_modules="lm_head", credit="uniform"),
    "r2-arca-s0-all-a2r": dict(rank=2, target_modules="all-linear", credit="arca", temperature=0.7),
}
HEAD, ALL = "r2-uniform-s0-head-a2r", "r2-arca-s0-all-a2r"


def build_tiny_sweep(tmp_path_factory, model_dir) -> Path:
    """A sweep directory in `arca-lab sweep`'s layout (runs/<run_id>/, sweep.nc from `combine_runs`) of the
    tiny runs SWEEP_RUNS, built once per test session (tests/test_analysis_notebook.py uses it too).

    The tiny random model never solves the task, so the reward is the completion length's parity: rewards then
    differ within a group and the adapter moves (lr 5e-2).
    """
    import arca_lab.tasks.arith as arith
    from arca_lab.results import write_netcdf
    from arca_lab.sweep import combine_runs

    root = tmp_path_factory.getbasetemp() / "tiny_sweep"
    with FileLock(f"{root}.lock"):
        if (root / "sweep.nc").is_file():
            return root
        shutil.rmtree(root, ignore_errors=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(arith.ArithTask, "reward", lambda self, c, a: float(len(c) % 2))
            for rid, overrides in SWEEP_RUNS.items():
                out = root / "runs" / rid
                cfg = make_config(
                    model=str(model_dir), lr=5e-2, sharpening=2.0, out=str(out), **TINY, **overrides
                )
                train(cfg, progress=False)
        write_netcdf(combine_runs(sorted((root / "runs").iterdir())), root / "sweep.nc")
    return root


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_sweep(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def verified(sweep):
    return {
        name: verify_run(sweep / "runs" / rid, keep_inputs=True)
        for name, rid in (("head", HEAD), ("all", ALL))
    }


def _checked(rows):
    return [r for r in rows if r.holds is not None]


def test_bounds_hold_on_trained_adapters(verified):
    head, full = verified["head"], verified["all"]
    assert head.measurement.kind == "head-only" and full.measurement.kind == "backbone"
    for v in (head, full):
        assert all(r.holds for r in _checked(v.rows)), [r for r in v.rows if r.holds is False]
        assert not [r for r in v.rows if r.failed]
        # the adapter moved, so the check is not 0 <= bound
        assert max(v.measurement.per_tau[1.0]["kl_ref_policy"]) > 1e-4
    names = {r.bound for r in head.rows}
    assert {
        "K(R D(dW)/tau) ball (P3)",
        "a-priori K(rho) (A6/A7)",
        "||x_t|| <= R = sqrt(d)max|g| (P2)",
    } <= names
    prior = [r for r in head.rows if r.bound == "a-priori K(rho) (A6/A7)"]
    assert len(prior) == 2 and all(0 < r.measured < r.bound_value < math.inf for r in prior)
    # all-linear: no a-priori bound (said so), the credit link per temperature, both temperatures measured
    assert [r.holds for r in full.rows if r.bound.startswith("a-priori")] == [None]
    assert sorted(full.measurement.per_tau) == [0.7, 1.0]
    assert {r.tau for r in full.rows if r.bound.startswith("alpha_div")} == {0.7, 1.0}


def _names(rows, kind):
    return {r.bound.removesuffix(" [tightest token]") for r in rows if r.kind == kind}


def test_lemma_rows_are_labelled_apart_from_the_bounds(verified):
    """Rows computed from the measured tokens' own logit shift (or the norm's radius) are lemma checks; only the
    ball, the a-priori bound and the sqrt2 credit link are bound checks (verify.KINDS)."""
    head, full = verified["head"].rows, verified["all"].rows
    assert _names(head, "lemma") == {
        "||x_t|| <= R = sqrt(d)max|g| (P2)",
        "||x_base_t|| <= R (P2)",
        "K(range(dW x_t)/tau) (L3)",
    }
    assert _names(head, "bound") == {"K(R D(dW)/tau) ball (P3)", "a-priori K(rho) (A6/A7)"}
    assert _names(head, "input") == {"a-priori input: lr schedule (A2)"}
    assert _names(full, "lemma") == {
        "||x_t|| <= R = sqrt(d)max|g| (P2)",
        "||x_base_t|| <= R (P2)",
        "K(range(W_lm dh_t)/tau) (L3)",
        "alpha_div <= range(W_lm dh_t)/tau (L6)",
    }
    assert _names(full, "bound") == {"alpha_div <= sqrt2 ||W_lm|| ||dh_t||/tau (P4)", "a-priori (A6/A7)"}
    assert not _names(full, "input")


def test_head_only_measurement_is_the_theorys_exact_kl(verified):
    """Per-token KLs and ranges equal theory.aposteriori.per_token_kl_bound on ΔW = s·B·A and the captured x."""
    v = verified["head"]
    m = v.measurement
    model = v_model_weights(v)
    out = per_token_kl_bound(model["delta_w"], m.x, temperature=1.0, base_weight=model["W0"])
    np.testing.assert_allclose(m.shift_range, out["logit_range"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        m.per_tau[1.0]["kl_ref_policy"], out["kl_ref_theta_exact"], rtol=1e-8, atol=1e-15
    )
    np.testing.assert_allclose(
        m.per_tau[1.0]["kl_policy_ref"], out["kl_theta_ref_exact"], rtol=1e-8, atol=1e-15
    )
    assert np.array_equal(m.x, m.x_base)  # head-only: the adapter does not change the input of lm_head
    assert m.head_logit_error < 1e-4  # float64 recomputation = the model's own float32 logits
    # R = √d·max|g| of the final RMSNorm (aposteriori.md P2), from the norm's weight directly
    g = model["norm_weight"]
    R = math.sqrt(g.size) * np.max(np.abs(g))
    radius_row = next(r for r in v.rows if r.bound.startswith("||x_t||"))
    assert radius_row.bound_value == pytest.approx(R, rel=1e-6)
    assert radius_row.measured == pytest.approx(np.linalg.norm(m.x, axis=1).max(), rel=1e-12)


def test_all_layer_measurement_is_the_theorys_exact_kl(verified):
    """KLs at τ = 0.7 by the lse forms of softmax_kl.md L1 and the credit link chain (P4) of theory.aposteriori."""
    v = verified["all"]
    m = v.measurement
    W0 = v_model_weights(v)["W0"]
    a, z = m.x_base @ W0.T, (m.x - m.x_base) @ W0.T  # base logits and logit shift, (N, V)
    np.testing.assert_allclose(
        m.per_tau[0.7]["kl_ref_policy"], kl_ref_theta(a, z, 0.7), rtol=1e-8, atol=1e-15
    )
    np.testing.assert_allclose(
        m.per_tau[0.7]["kl_policy_ref"], kl_theta_ref(a, z, 0.7), rtol=1e-8, atol=1e-15
    )
    link = credit_link_bound(W0, m.x - m.x_base, m.per_tau[0.7]["logp_diff"], temperature=0.7)
    assert link["holds"]
    np.testing.assert_allclose(m.shift_range / 0.7, link["range_bound"], rtol=1e-10)
    np.testing.assert_allclose(m.dh_norm, link["alpha_arca"], rtol=1e-12)
    assert m.dh_norm.max() > 1e-3  # the backbone adapter changed the input of lm_head


def v_model_weights(v) -> dict[str, np.ndarray]:
    """W0, ΔW and the final norm weight of a run, read from a fresh load (independent of the measurement)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(v.config.model)
    norm_weight = base.model.norm.weight.detach().double().numpy()
    W0 = base.lm_head.weight.detach().double().numpy()
    model = PeftModel.from_pretrained(base, v.run_dir / "adapter")
    head = model.base_model.model.lm_head
    out = {"W0": W0, "norm_weight": norm_weight}
    if hasattr(head, "lora_A"):
        s = head.scaling["default"]
        B = head.lora_B["default"].weight.detach().double().numpy()
        A = head.lora_A["default"].weight.detach().double().numpy()
        out["delta_w"] = s * B @ A
    return out


def test_apriori_inputs_come_from_the_run(sweep):
    ds = load_run(sweep / "runs" / HEAD)
    inputs = apriori_inputs(ds, "lm_head", input_radius=3.0, temperature=1.0)
    assert (inputs.rank, inputs.alpha, inputs.steps, inputs.lr) == (2, 4.0, 2, 5e-2)  # alpha "2r" = 4
    assert lora_scale(inputs.scaling, inputs.alpha, inputs.rank) == 2.0  # = s of peft: alpha / r
    assert (
        inputs.schedule == "constant_with_warmup" and inputs.optimizer == "adamw" and inputs.grad_clip == 1.0
    )
    assert inputs.a0_norm == float(ds["a0_op"].sel(layer="lm_head")) > 0
    # the schedule mapping is the one the trainer used
    for name, theory_name in SCHEDULES.items():
        cfg = make_config(lr_schedule=name, out="unused")
        assert str(grpo_args(cfg, "unused", progress=False).lr_scheduler_type.value) == theory_name


def test_schedule_input_check_fails_on_a_wrong_schedule(sweep):
    ds = load_run(sweep / "runs" / HEAD)
    err, tol, n = verify.schedule_error(ds)
    assert n == 2 and err <= tol == pytest.approx(5e-8)  # lr 5e-2
    wrong = ds.assign(learning_rate=ds["learning_rate"] * 1.01)  # 1 % off the schedule
    err, tol, n = verify.schedule_error(wrong)
    assert err > tol
    err, _, _ = verify.schedule_error(ds.assign(learning_rate=ds["learning_rate"] * math.nan))
    assert math.isnan(err)  # and a NaN never holds (test_nan_never_holds)
    assert math.isnan(verify.schedule_error(ds.drop_vars("learning_rate"))[0])  # nothing recorded


def test_cli_passes_and_halved_inputs_fail(sweep, capsys, tmp_path):
    assert main([str(sweep)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert {line.split()[0] for line in lines[2:-1]} == {f"runs/{rid}" for rid in SWEEP_RUNS}
    assert lines[0].split()[:3] == ["run", "kind", "bound"]
    assert {line.split()[1] for line in lines[2:-1]} == {"bound", "lemma", "input"}
    # Counted per kind. Head-only runs (2, tau 1): ball + a-priori in 2 directions = 4 bounds; 2 radius rows + L3
    # in 2 directions = 4 lemmas; 1 schedule input. All-linear run (tau 1 and 0.7): P4 per tau = 2 bounds (its
    # a-priori row is n/a: not counted); 2 radius rows + per tau (L3 x 2 + L6) = 8 lemmas.
    assert lines[-1] == (
        "verify-bound: 3 run(s): 10 bound checks (ball, a-priori, credit link), 16 lemma checks "
        "(K(range(z_t)/tau), alpha_div <= range(z_t)/tau, ||x_t|| <= R), 2 input checks (lr schedule); "
        "0 violated: all hold"
    )

    table = tmp_path / "halved.csv"
    assert main([str(sweep), "--scale-inputs", "0.5", "--csv", str(table)]) == 1
    text = capsys.readouterr().out
    assert "all hold" not in text
    assert "lemma check(s) failed (expected with scaled inputs)" in text and "a bug" not in text
    rows = list(csv.DictReader(table.open()))
    assert {r["run"] for r in rows} == {f"runs/{rid}" for rid in SWEEP_RUNS}
    assert list(rows[0]) == list(verify.COLUMNS) and {r["kind"] for r in rows} == {"bound", "lemma", "input"}
    for rid in SWEEP_RUNS:
        failed = {(r["kind"], r["bound"]) for r in rows if r["run"] == f"runs/{rid}" and r["holds"] == "NO"}
        # P2 (R halved: the tiny model's gain is 1, so ||x|| = R up to eps) and the per-token KL bound: lemmas
        assert any(k == "lemma" and b.startswith("||x_t|| <= R") for k, b in failed), failed
        assert any(k == "lemma" and b.startswith("K(range(") for k, b in failed), failed


def test_not_a_run_directory_is_a_clear_error(tmp_path, sweep, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == EX_USAGE
    assert "neither a run directory" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(sweep / "runs" / HEAD / "config.json", half / "config.json")  # no run.nc
    assert main([str(half)]) == EX_USAGE
    assert main([str(tmp_path / "missing")]) == EX_USAGE
    assert "is not a directory" in capsys.readouterr().err
    assert main([str(sweep / "runs" / HEAD), "--scale-inputs", "0"]) == EX_USAGE
    with pytest.raises(ValueError, match=r"config\.json and run\.nc"):
        verify_run(half)


def test_sweep_mode_finds_every_run_and_skips_staging(sweep, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(sweep / "runs" / HEAD, root / "a" / "r1")
    shutil.copytree(sweep / "runs" / ALL, root / "b")
    shutil.copytree(sweep / "runs" / ALL, root / ".b.partial-x")  # an unfinished run being written
    assert find_runs(root) == [root / "a" / "r1", root / "b"]
    assert find_runs(root / "b") == [root / "b"]
    # in a sweep directory, a failed run's kept output (failed/<id>/run) is not a run to verify
    shutil.copytree(sweep / "runs" / ALL, root / "failed" / "x" / "run")
    assert find_runs(root)[-1] == root / "failed" / "x" / "run"  # not a sweep directory: found
    (root / "sweep.json").write_text("{}")
    assert find_runs(root) == [root / "a" / "r1", root / "b"]


def test_rows_report_the_tightest_token():
    rows = _Rows("r", rtol=1e-5)
    rows.per_token("K", "d", 1.0, [0.1, 0.5, 0.0], [1.0, 0.6, 0.0], kind="bound")
    assert (rows[0].measured, rows[0].bound_value, rows[0].holds) == (0.5, 0.6, True)
    rows.per_token("K", "d", 1.0, [0.1, 0.7], [1.0, 0.6], kind="bound")  # 0.7 > 0.6: violated
    rows.per_token("K", "d", 1.0, [1e-3, 0.1], [0.0, 1.0], kind="bound")  # positive KL where the bound is 0
    rows.whole("ball", "d", 1.0, [0.2, 0.3], 0.3 * (1 + 1e-6), kind="bound")  # within rtol of the bound
    assert [r.holds for r in rows] == [True, False, False, True]
    assert [r.failed for r in rows] == [False, True, True, False]
    assert rows[2].ratio == math.inf and rows[1].ratio == pytest.approx(0.7 / 0.6)
    with pytest.raises(ValueError, match="row kind 'theorem'"):
        rows.whole("ball", "d", 1.0, [0.2], 1.0, kind="theorem")


def test_nan_never_holds():
    """A NaN measured value or bound is a failure, in a per-token row, a whole row and the verdicts."""
    rows = _Rows("r", rtol=1e-5)
    rows.per_token("K", "d", 1.0, [0.1, math.nan, 0.2], [1.0, 1.0, 1.0], kind="lemma")  # NaN measured
    rows.per_token("K", "d", 1.0, [0.0, 0.1], [math.nan, 1.0], kind="lemma")  # NaN bound where KL is 0
    rows.whole("ball", "d", 1.0, [0.2, math.nan], 1.0, kind="bound")  # NaN among the measured values
    rows.whole("ball", "d", 1.0, [0.2], math.nan, kind="bound")  # NaN bound
    rows.whole("ball", "d", 1.0, [], 1.0, kind="bound")  # nothing measured: not applicable, not "holds"
    assert [r.holds for r in rows] == [False, False, False, False, None]
    assert [r.failed for r in rows] == [True, True, True, True, False]
    # the row shown is the token with the NaN
    assert math.isnan(rows[0].measured) and math.isnan(rows[1].bound_value)
    # a row whose flag says it holds but whose numbers are NaN still fails
    assert BoundRow("r", "bound", "b", "d", 1.0, math.nan, 1.0, True).failed
    assert BoundRow("r", "bound", "b", "d", 1.0, 0.5, math.nan, True).failed
    assert not BoundRow("r", "bound", "b", "d", 1.0, 0.5, 1.0, True).failed
    assert not BoundRow("r", "bound", "b", "d", None, math.nan, math.nan, None).failed  # n/a
    summary = check_summary(rows)
    assert summary.startswith("2 bound checks (ball, a-priori, credit link), 2 lemma checks")
    assert "2 bound check(s) violated: r: ball" in summary and "all hold" not in summary
    assert "nan" in verify.format_table(list(rows)).splitlines()[2]  # a checked NaN is shown, not "-"


def test_cli_reports_a_failed_lemma_as_a_bug(sweep, capsys, monkeypatch):
    """Exit 1 on a failed lemma row, reported as a bug and not counted as a bound; a NaN bound row fails too."""
    rows = [
        BoundRow("x", "lemma", "K(range(z_t)/tau) (L3) [tightest token]", "d", 1.0, 0.3, 0.2, False),
        BoundRow("x", "bound", "K(R D(dW)/tau) ball (P3)", "d", 1.0, 0.1, 1.0, True),
    ]

    def fake_verify_run(run, **kwargs):
        return verify.RunVerification(run, list(rows), None, None)  # type: ignore[arg-type]

    monkeypatch.setattr(verify, "verify_run", fake_verify_run)
    assert main([str(sweep / "runs" / HEAD)]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(
        "verify-bound: 1 run(s): 1 bound checks (ball, a-priori, credit link), 1 lemma checks"
    )
    assert "1 LEMMA check(s) failed: a bug in the measurement or theory code" in last
    assert "bound check(s) violated" not in last

    rows[:] = [BoundRow("x", "bound", "a-priori K(rho) (A6/A7)", "d", 1.0, 0.1, math.nan, True)]
    assert main([str(sweep / "runs" / HEAD)]) == 1
    assert "1 bound check(s) violated: x: a-priori K(rho) (A6/A7)" in capsys.readouterr().out


def test_final_norm_is_found_generically(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    qwen = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert final_norm(qwen) is qwen.model.norm
    torch.manual_seed(0)
    with torch.no_grad():
        qwen.model.norm.weight.uniform_(-2, 2)
    # RMSNorm(c·1) = g·c/sqrt(c² + eps) = g up to eps/c²
    np.testing.assert_allclose(
        effective_gain(qwen.model.norm, 32), qwen.model.norm.weight.detach().numpy(), rtol=1e-6
    )
    gpt2 = AutoModelForCausalLM.from_pretrained(make_tiny_causal_lm(tmp_path / "gpt2", "gpt2"))
    assert final_norm(gpt2) is None  # LayerNorm: P2 does not apply, the radius rows are skipped
