"""End to end: `train` writes a valid run directory; real-model path on stand-ins; CLI errors that name the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

from arca_lab.cli import main
from arca_lab.config import make_config
from arca_lab.exit_codes import EX_USAGE
from arca_lab.results import load_run, load_run_variables
from arca_lab.run import train
from arca_lab.testing import make_tiny_causal_lm

DATA = Path(__file__).parent / "data" / "math_tiny.jsonl"
TINY = dict(
    steps=2, prompts_per_step=2, num_generations=2, max_completion_length=12, eval_prompts=4, pass_k=2
)


def test_train_writes_a_complete_run(tiny_model_dir, tmp_path):
    out = train(
        make_config(model=str(tiny_model_dir), credit="arca", rank=2, out=str(tmp_path / "r"), **TINY),
        progress=False,
    )
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json", "run.nc"]
    ds = load_run(out)
    assert ds.sizes["step"] == 2
    for name in (
        "reward",
        "learning_rate",
        "grad_norm",
        "credit_gini",
        "credit_etr",
        "credit_effn",
        "kl_ref_policy_mean",
        "kl_policy_ref_max",
        "kl_k3_mean",
        "residual_max",
        "credit_role_mass_format",
        "head_input_max_norm",
    ):
        assert ds[name].dims == ("step",), name
    assert ds["weights"].dims == ("sample", "token")
    mask = ds["completion_mask"].values.astype(bool)
    w = ds["weights"].values
    assert math.isclose(float(w[mask].sum()), mask.any(axis=1).sum(), rel_tol=1e-5)  # each row sums to 1
    assert math.isnan(w[~mask]).all() if (~mask).any() else True
    assert ds["a0_fro"].dims == ("layer",) and (ds["a0_fro"] > 0).all()
    assert float(ds["w_lm_op_norm"]) > 0 and float(ds["max_head_input_norm"]) > 0
    assert ds["rank"].item() == 2 and ds["credit"].item() == "arca"
    cfg = json.loads(ds.attrs["config_json"])
    assert cfg["credit"] == "arca" and ds.attrs["git_sha"]
    base = json.loads(ds.attrs["base_model_json"])
    assert (
        base["name_or_path"] == str(tiny_model_dir) and "embedded_build" not in base
    )  # not an embedded build
    assert json.loads((out / "config.json").read_text()) == cfg


@pytest.mark.parametrize(
    ("arch", "targets"), [("qwen3", "all-linear"), ("llama", "lm_head"), ("gpt2", "all-linear")]
)
def test_real_model_path_on_standins(tmp_path, arch, targets):
    """The --model DIR / --task math path (math-verify reward, boxed answers) on tiny local stand-ins."""
    model_dir = make_tiny_causal_lm(tmp_path / arch, arch)
    cfg = make_config(
        model=str(model_dir),
        task="math",
        data=str(DATA),
        credit="divergence",
        rank=2,
        target_modules=targets,
        max_prompt_length=128,
        out=str(tmp_path / "run"),
        **TINY,
    )
    out = train(cfg, progress=False)
    ds = load_run(out)
    assert ds.sizes["step"] == 2 and ds["task"].item() == "math"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    names = [n for n, _ in adapted.named_parameters() if "lora_A" in n]
    assert names and all(("lm_head" in n) == (targets == "lm_head") for n in names)


def test_cli_help_lists_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--sharpening" in text and "Power p on the scores" in text and "--target-modules" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--credit", "gini"], "choose one of"),
        (["--rank", "0"], "rank >= 1"),
        (["--scaling", "sqrt"], "choose one of"),
        (["--model", "./no/such/dir"], "does not exist"),
        (["--alpha", "two"], "rank multiple"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "x"), *args]) == EX_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_output_is_kept(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "done"
    out.mkdir()
    (out / "run.nc").write_text("finished results")
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(out)]) == EX_USAGE
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite whose run fails (NaN reward) leaves the finished directory untouched
    import arca_lab.tasks.arith as arith

    monkeypatch.setattr(arith.ArithTask, "reward", lambda self, c, a: float("nan"))
    cfg = make_config(model=str(tiny_model_dir), out=str(out), overwrite=True, **TINY)
    with pytest.raises(ValueError, match="NaN reward"):
        train(cfg, progress=False)
    assert (out / "run.nc").read_text() == "finished results"
    assert [p.name for p in tmp_path.iterdir()] == ["done"]  # no staging directory left behind


def test_overwrite_replaces_after_success(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    cfg = make_config(model=str(tiny_model_dir), out=str(out), **TINY)
    train(cfg, progress=False)
    first = load_run(out).attrs["config_json"]
    torch.manual_seed(0)
    train(
        make_config(model=str(tiny_model_dir), out=str(out), overwrite=True, seed=1, **TINY), progress=False
    )
    assert json.loads(load_run(out).attrs["config_json"])["seed"] == 1 != json.loads(first)["seed"]


def test_base_model_info_names_the_embedded_build(tmp_path):
    from arca_lab.embedded import BUILD_INFO
    from arca_lab.results import base_model_info

    meta = {"name": "embedded", "seed": 3, "build_hash": "abc123", "build_id": "f00", "final_accuracy": 0.41}
    (tmp_path / BUILD_INFO).write_text(json.dumps(meta | {"eval_history": [[1, 0.1]]}))
    info = base_model_info(str(tmp_path))
    assert info["name_or_path"] == str(tmp_path)
    assert info["embedded_build"]["build_hash"] == "abc123" and info["embedded_build"]["seed"] == 3
    assert "eval_history" not in info["embedded_build"]
    assert base_model_info("Qwen/Qwen3-1.7B-Base") == {"name_or_path": "Qwen/Qwen3-1.7B-Base"}


def test_save_every_keeps_the_adapter_of_that_step(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--save-every 2 over 4 steps: checkpoints/step-00002 holds the LoRA weights as they were after step 2
    (recorded by a callback at that moment), the final adapter those after step 4; eval --checkpoints tables both.
    """
    from safetensors.torch import load_file

    import arca_lab.run as run_module

    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = {
                n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n
            }

    original = run_module.ArcaGRPOTrainer

    def with_snapshot(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Snapshot()]
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "ArcaGRPOTrainer", with_snapshot)
    # the tiny random model never solves the task: reward the completion length's parity so the adapter moves
    monkeypatch.setattr(
        run_module.get_task("arith").__class__, "reward", lambda self, c, a: float(len(c) % 2)
    )
    cfg = make_config(
        model=str(tiny_model_dir), out=str(tmp_path / "run"), save_every=2, lr=5e-2, **{**TINY, "steps": 4}
    )
    out = train(cfg, progress=False)
    assert [s for s, _ in run_module.checkpoints(out)] == [2, 4]
    saved = load_file(out / "checkpoints" / "step-00002" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    key = next(k for k in saved if "lora_B" in k)
    live = next(v for n, v in seen[2].items() if n.endswith(key.replace(".weight", ".default.weight")))
    torch.testing.assert_close(saved[key], live)
    assert not torch.equal(saved[key], final[key])  # the adapter moved between step 2 and step 4
    monkeypatch.undo()
    assert main(["eval", str(out), "--checkpoints", "--eval-prompts", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[-2:]] == ["2", "4"]


def test_the_base_evaluation_is_reused_only_for_the_same_base_and_settings(tiny_model_dir, tmp_path):
    """A warm sweep kernel evaluates the base model once: a later run's `*_before` equal those of the same run
    evaluated from scratch, every other variable too; other eval settings get their own evaluation."""
    import dataclasses

    import numpy as np

    from arca_lab import run as run_module

    def cfg(name: str, **values):
        return make_config(
            model=str(tiny_model_dir), rank=2, threads=1, out=str(tmp_path / name), **TINY | values
        )

    run_module._BEFORE.clear()
    train(cfg("first", seed=1), progress=False)
    reused = load_run(train(cfg("reused", seed=2), progress=False))
    assert len(run_module._BEFORE) == 1
    run_module._BEFORE.clear()
    fresh = load_run(train(cfg("fresh", seed=2), progress=False))
    for name in sorted(set(fresh.data_vars) - {"step_time"}):
        np.testing.assert_array_equal(reused[name].values, fresh[name].values, err_msg=name)
    fewer = load_run(train(dataclasses.replace(cfg("fewer", seed=2), eval_prompts=2), progress=False))
    assert fewer["greedy_correct_before"].size == 2  # not the cached 4-prompt result


def test_a_run_read_back_in_its_process_is_the_file(tiny_model_dir, tmp_path):
    import xarray as xr

    out = train(
        make_config(model=str(tiny_model_dir), rank=2, out=str(tmp_path / "r"), **TINY), progress=False
    )
    full = xr.load_dataset(out / "run.nc", engine="h5netcdf")
    xr.testing.assert_identical(load_run(out), full)
    # a few variables read alone (verify-bound's inputs): the same values, attrs, dims and coordinates
    names = ["learning_rate", "a0_op", "w_lm_op_norm", "lr", "lr_schedule", "grad_clip", "rank", "no_such"]
    part = load_run_variables(out, names)
    expected = full[["learning_rate", "a0_op", "w_lm_op_norm"]].reset_coords(drop=True)
    expected = expected.assign_coords(
        {n: full[n].variable for n in ("lr", "lr_schedule", "grad_clip", "rank")}
    )
    xr.testing.assert_identical(part, expected)
    assert part["lr_schedule"].dtype.kind == "U" and part["layer"].dtype.kind == "U"  # decoded, not bytes
    (out / "run.nc").write_bytes(b"truncated")  # a changed file is read again, never served from memory
    with pytest.raises(OSError):
        load_run(out)


def test_eval_at_scores_the_adapter_of_that_step_and_changes_nothing_else(
    tiny_model_dir, tmp_path, monkeypatch
):
    """eval_at "2" over 4 steps: greedy_correct_at[2] equals the step-2 checkpoint scored afresh, and every other
    run.nc variable equals the same run without eval_at (the callback does not disturb training)."""
    import numpy as np

    from arca_lab.evaluate import evaluate
    from arca_lab.models import load_policy
    from arca_lab.run import EVAL_SEED, load_task
    from arca_lab.tasks import ArithTask

    # the tiny random model never solves the task: score the parity of the completion's characters instead
    monkeypatch.setattr(ArithTask, "reward", lambda self, c, a: float(sum(map(ord, c)) % 2))
    common = dict(
        model=str(tiny_model_dir), save_every=2, lr=5e-2, threads=1, **{**TINY, "steps": 4, "eval_prompts": 8}
    )
    with_at = load_run(train(make_config(out=str(tmp_path / "at"), eval_at="2", **common), progress=False))
    plain = load_run(train(make_config(out=str(tmp_path / "plain"), **common), progress=False))
    assert list(with_at["eval_step"].values) == [2]
    cfg = make_config(out=str(tmp_path / "x"), **common)
    model, tok = load_policy(cfg)
    policy = PeftModel.from_pretrained(model, tmp_path / "at" / "checkpoints" / "step-00002")
    task = load_task(cfg)
    rows = task.eval_rows(cfg.eval_prompts, seed=EVAL_SEED)
    fresh = evaluate(policy, tok, task, rows, k=0, max_new_tokens=cfg.max_completion_length).greedy_correct
    np.testing.assert_array_equal(with_at["greedy_correct_at"].sel(eval_step=2).values, fresh)
    assert 0 < fresh.mean() < 1, "the check needs prompts scored both ways"
    assert float(with_at["greedy_accuracy_at"].sel(eval_step=2)) == fresh.mean()
    for name in plain.data_vars:
        if name != "step_time":
            np.testing.assert_array_equal(with_at[name].values, plain[name].values, err_msg=name)
    with pytest.raises(ValueError, match=r"eval_at='4' is not valid: steps must lie in \[1, steps - 1 = 3\]"):
        make_config(eval_at="4", **common)
