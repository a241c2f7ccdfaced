"""`arca-lab theory` CLI (theory/cli.py): printing the bounds and the reduced numerical check."""

from __future__ import annotations

import pytest

from theory import apriori
from theory.cli import HEADER, main

QUICK = ["check", "--quick", "--seeds", "5", "--random", "12"]


def test_show_prints_pretty_and_latex_expressions(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "LaTeX: \\frac{\\rho^{2}}{8}" in out  # the Hoeffding bound ρ²/8 (softmax_kl L4)
    assert "apriori A6" in out and "apriori A7" in out
    assert "stated before fitting" in out


def test_quick_check_passes_and_prints_the_table(capsys):
    assert main(QUICK) == 0
    out = capsys.readouterr().out
    assert HEADER in out
    assert "violations: 0 / 12" in out
    assert "== gamma: predicted vs fitted" in out and "smallest relative margin" in out


def test_a_halved_bound_makes_check_fail(capsys, monkeypatch):
    real = apriori.apriori_kl_bound_array

    def halved(inputs, **overrides):
        out = real(inputs, **overrides)
        return {k: v / 2 if k.startswith("kl_") else v for k, v in out.items()}

    monkeypatch.setattr(apriori, "apriori_kl_bound_array", halved)
    assert main(QUICK) == 1
    out = capsys.readouterr().out
    assert " NO" in out and "bounds VIOLATED" in out


def test_bad_arguments_exit_with_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["check", "--seeds", "2"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["check", "--boot", "10"])
