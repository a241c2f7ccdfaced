"""notebooks/grpo_run.ipynb: its parameters cell is RunConfig (generated, cannot drift), and it runs under papermill
in the runner's interpreter (sweep-local kernelspec), writing a run.nc with the documented variables and figures."""

from __future__ import annotations

import json
import sys
from dataclasses import fields

import pytest

from arca_lab.config import RunConfig, field_docs, make_config
from arca_lab.results import load_run
from arca_lab.sweep.execute import (
    EXTRA_PARAMETERS,
    RUN_NOTEBOOK,
    config_from_parameters,
    execute_notebook,
    install_kernel,
    notebook_parameters,
    parameter_lines,
)

pm = pytest.importorskip("papermill")
TINY = dict(
    steps=2, prompts_per_step=2, num_generations=2, max_completion_length=12, eval_prompts=4, pass_k=2
)


def _cells() -> list[dict]:
    return json.loads(RUN_NOTEBOOK.read_text())["cells"]


def test_committed_notebook_is_stripped_and_its_parameters_are_runconfig():
    code = [c for c in _cells() if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    # The cell is exactly what the generator writes from RunConfig today: a new field fails this test.
    assert "".join(tagged[0]["source"]) == "\n".join(parameter_lines()), (
        "run `python -m arca_lab.sweep.execute`"
    )

    declared = pm.inspect_notebook(str(RUN_NOTEBOOK))
    names = [f.name for f in fields(RunConfig)]
    # papermill silently skips lines it cannot parse (a second "=", a "|" in the annotation): all must survive.
    assert list(declared) == [*names, *EXTRA_PARAMETERS]
    docs = field_docs(RunConfig)
    for name in names:
        help_text = declared[name]["help"]
        assert "=" not in help_text
        # Same words as the docstring, except "=" rewritten (scaling's "(s = alpha ...)" -> "(s is alpha ...)").
        assert help_text == " ".join(docs[name].replace("=", " is ").split()), name
    assert declared["data"]["inferred_type_name"] == "Optional[str]"
    assert declared["grad_clip"]["inferred_type_name"] == "Optional[float]"
    assert declared["rank"]["default"] == "8" and declared["model"]["default"] == '"embedded"'


def test_parameters_round_trip_to_the_same_config():
    cfg = make_config(credit="arca", rank=3, grad_clip=None, data=None, target_modules="lm_head", seed=7)
    params = notebook_parameters(cfg, figures_dir="figs")
    assert params["figures_dir"] == "figs" and params["grad_clip"] is None
    assert config_from_parameters(params) == cfg
    with pytest.raises(ValueError, match="accepted: \\['figures_dir', 'progress'\\]"):
        notebook_parameters(cfg, colour="red")


def test_kernelspec_runs_this_interpreter(tmp_path):
    name = install_kernel(tmp_path, threads=1)
    spec = json.loads((tmp_path / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["env"]["OMP_NUM_THREADS"] == "1"


def test_notebook_runs_with_tiny_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(model=str(tiny_model_dir), credit="arca", rank=2, out=str(out), threads=1, **TINY)
    jupyter = tmp_path / "jupyter"
    install_kernel(jupyter, threads=1)
    executed = tmp_path / "executed.ipynb"
    execute_notebook(RUN_NOTEBOOK, executed, notebook_parameters(cfg), jupyter, tmp_path)

    ds = load_run(out)
    assert ds.sizes["step"] == 2 and ds["rank"].item() == 2 and ds["credit"].item() == "arca"
    for name in ("reward", "kl_ref_policy_mean", "kl_policy_ref_mean", "credit_gini", "credit_etr"):
        assert ds[name].dims == ("step",), name
    assert ds["weights"].dims == ("sample", "token") and ds["a0_fro"].dims == ("layer",)
    assert json.loads(ds.attrs["config_json"]) == json.loads(cfg.to_json())
    for png in ("curves.png", "weights.png"):
        assert (out / "figures" / png).stat().st_size > 5_000, png  # a drawn figure, not an empty canvas
    nb = json.loads(executed.read_text())
    printed = "".join(
        "".join(o.get("text", ""))
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
    )
    assert (
        f"python: {sys.executable}\n" in printed
    )  # the kernel is this interpreter, not a "python3" found on PATH
    assert nb["metadata"]["papermill"]["parameters"]["rank"] == 2
    assert f"kernelspec: {(jupyter / 'kernels' / 'arca-lab-sweep').resolve()}\n" in printed
