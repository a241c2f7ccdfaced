"""notebooks/theory_explorer.ipynb executes under papermill with small parameters and writes its figures.

The kernel is the "python3" kernelspec: its argv starts with "python", which jupyter_client replaces by the
caller's sys.executable, so the notebook runs in this interpreter (asserted from the notebook's own output).
A relative `out_dir` is read from the repository root (arca_lab.paths), not from the kernel's directory.
"""

import os
import sys
from pathlib import Path

import pytest

from arca_lab.paths import REPO_ROOT

pm = pytest.importorskip("papermill")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "theory_explorer.ipynb"
FIGURES = ("apriori_kl_vs_rank.png", "credit_intervals_vs_spread.png", "prop2_divergence_vs_beta.png")


def test_notebook_runs_with_small_parameters(tmp_path):
    figs = tmp_path / "figs"
    params = {
        "steps": 5,
        "warmup": 1,
        "ranks": [1, 4],
        "scalings": ["alpha/r", "rslora"],
        "optimizers": ["sgd", "adamw"],
        "T": 16,
        "sharpenings": [1.0, 2.0],
        "n_points": 20,
        "out_dir": os.path.relpath(
            figs, REPO_ROOT
        ),  # the kernel starts in tmp_path: still the same directory
    }
    assert set(params) <= set(pm.inspect_notebook(str(NOTEBOOK)))
    out = pm.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters=params,
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    for name in FIGURES:
        assert (figs / name).stat().st_size > 5_000, name  # a real plot, not an empty canvas
    printed = "".join(
        "".join(o.get("text", "")) for c in out["cells"] if c["cell_type"] == "code" for o in c["outputs"]
    )
    assert f"python: {sys.executable}" in printed
    assert f"figures: {figs}" in printed
    # The regime table ran: T = 16, scores in [0, 1e-6], p = 2 fall back (16 · (1e-6)² ≤ 1e-8).
    assert "scores in [0, 1e-06], p = 2: fallback-uniform" in printed
