"""notebooks/grpo_run.ipynb: its parameters cell is RunConfig (generated, cannot drift), and it runs under papermill
in the runner's interpreter (sweep-local kernelspec), writing a run.nc with the documented variables and figures."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import fields

import nbformat
import numpy as np
import pytest
from nbclient.exceptions import DeadKernelError

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
from arca_lab.sweep.kernel import WarmKernel

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


def _printed(notebook) -> str:
    nb = json.loads(notebook.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))


# run.nc variables that measure time, not the run: they differ between any two executions
TIMING_VARIABLES = ("step_time",)


def test_a_warm_kernel_runs_each_notebook_as_a_fresh_kernel_would(tiny_model_dir, tmp_path):
    """Three notebooks in one warm kernel: the second equals the same config run alone in a new kernel (the run
    before it leaves nothing behind), a warning shows in every run it applies to, the counter restarts at 1."""
    jupyter = tmp_path / "jupyter"
    install_kernel(jupyter, threads=1)

    def config(name: str, **values):
        return make_config(model=str(tiny_model_dir), out=str(tmp_path / name), threads=1, **TINY | values)

    head_arca = dict(
        credit="arca", target_modules="lm_head", seed=3
    )  # the trainer warns: ARCA == uniform here
    alone = config("alone", rank=2, seed=1, sharpening=2.0)
    execute_notebook(RUN_NOTEBOOK, tmp_path / "alone.ipynb", notebook_parameters(alone), jupyter, tmp_path)
    with WarmKernel(jupyter) as kernel:
        for name, cfg in (
            ("first", config("first", **head_arca)),
            ("second", dataclasses.replace(alone, out=str(tmp_path / "second"))),
            ("third", config("third", **head_arca)),
        ):
            kernel.execute(RUN_NOTEBOOK, tmp_path / f"{name}.ipynb", notebook_parameters(cfg), tmp_path)
        assert kernel.starts == 1 and kernel.notebooks == 3

    fresh, warm = load_run(tmp_path / "alone"), load_run(tmp_path / "second")
    assert set(fresh.data_vars) == set(warm.data_vars)
    for name in sorted(set(fresh.data_vars) - set(TIMING_VARIABLES)):
        np.testing.assert_array_equal(warm[name].values, fresh[name].values, err_msg=name)
    assert "a new kernel" in _printed(tmp_path / "alone.ipynb")
    for n, name in enumerate(("first", "second", "third"), start=1):
        printed = _printed(tmp_path / f"{name}.ipynb")
        assert f"notebook {n} executed in it; namespace reset before it" in printed, name
        cells = json.loads((tmp_path / f"{name}.ipynb").read_text())["cells"]
        counts = [c["execution_count"] for c in cells if c["cell_type"] == "code"]
        assert counts == list(range(1, len(counts) + 1)), name  # as in a new kernel
    for name in ("first", "third"):  # "warn once" would have shown it in the first notebook only
        assert "ARCA == uniform credit here" in _printed(tmp_path / f"{name}.ipynb"), name


def test_a_warm_kernel_that_died_is_replaced_for_the_next_notebook(tmp_path):
    jupyter = tmp_path / "jupyter"
    install_kernel(jupyter)
    stub = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "die: bool = False  # end the kernel", metadata={"tags": ["parameters"]}
            ),
            nbformat.v4.new_code_cell("import os\nif die:\n    os._exit(1)\nprint('pid', os.getpid())"),
        ],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
    )
    nbformat.write(stub, tmp_path / "stub.ipynb")
    with WarmKernel(jupyter) as kernel:
        kernel.execute(tmp_path / "stub.ipynb", tmp_path / "a.ipynb", {}, tmp_path)
        with pytest.raises(DeadKernelError):
            kernel.execute(tmp_path / "stub.ipynb", tmp_path / "b.ipynb", {"die": True}, tmp_path)
        kernel.execute(tmp_path / "stub.ipynb", tmp_path / "c.ipynb", {}, tmp_path)
        assert kernel.starts == 2 and kernel.notebooks == 3
    pids = [_printed(tmp_path / f"{name}.ipynb").split()[-1] for name in ("a", "c")]
    assert pids[0] != pids[1]  # the third notebook ran in a new kernel


_FREEZE_CHECK = """
import gc
import sys
import weakref

from IPython.core.interactiveshell import InteractiveShell

import arca_lab.sweep.kernel as k


class Node:
    pass


def cycle(namespace=None):
    a, b = Node(), Node()
    a.b, b.a = b, a  # only the cycle collector frees it, as a notebook's figures or a run's model graph
    if namespace is not None:
        namespace["fig"] = a  # held by the notebook's namespace until the next reset
    return weakref.ref(a)


freezes = []
freeze = gc.freeze
gc.freeze = lambda: (freezes.append(len(sys.modules)), freeze())[1]

shell = InteractiveShell.instance()  # the real reset: it collects, then clears the namespace
k.fresh_namespace(shell)
frozen = gc.get_freeze_count()
dead1 = cycle(shell.user_ns)
sys.modules["_imported_by_run1"] = type(sys)("_imported_by_run1")  # run 1 imported a module: freeze again
k.fresh_namespace(shell)
dead2 = cycle()  # run 2's garbage, made after the freeze
k.fresh_namespace(shell)  # no module added: no freeze
gc.collect()  # what accelerate does at the end of the next trainer.train()
print(frozen > 0, len(freezes) == 2, freezes[-1] > freezes[0], dead1() is None, dead2() is None)
"""


def test_a_warm_kernel_freezes_imports_but_still_collects_each_runs_objects():
    """fresh_namespace freezes what is alive after IPython's reset (imports), again only when modules were added;
    the last notebook's reference cycles are not frozen with them, and a later run's cycles are still collected."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FREEZE_CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"] * 5, out.stdout + out.stderr
