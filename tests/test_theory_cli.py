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
    assert "21/21 rows agree" in out and "effective independent tests" in out
    assert "pred(d),snr,T=2" in out  # clipped SGD rows carry their post-hoc tags (rank_scaling.md §9)


def test_shifted_gamma_predictions_make_the_quick_check_fail(capsys):
    # --shift-gamma 1 adds 1 to every prediction: the seed-unit intervals of 5 seeds must exclude it
    assert main([*QUICK, "--shift-gamma", "1"]) == 1
    out = capsys.readouterr().out
    assert "SOME CHECKS FAILED" in out and "bounds hold" in out  # the bounds are not what failed
    assert "gamma disagrees for sgd/inactive/alpha/r/2r/V=2" in out and "outside" in out


def test_without_an_interval_the_tolerance_rule_decides(capsys):
    # 2 seeds: no interval (MIN_SEEDS = 3), so |fit - pred(d)| <= 0.5 decides; a shift of 1 cannot pass it
    assert main(["check", "--quick", "--seeds", "2", "--random", "3", "--shift-gamma", "1"]) == 1
    out = capsys.readouterr().out
    assert "no confidence interval (needs >= 3)" in out and "> 0.5" in out


@pytest.mark.slow
def test_full_check_passes_and_fails_when_shifted(capsys):
    # The full check (48 seeds, half-width <= 0.15 enforced) also runs in CI (.ci/run); ~20-30 s each.
    assert main(["check"]) == 0
    assert main(["check", "--shift-gamma", "1"]) == 1
    out = capsys.readouterr().out
    assert "0/21 rows agree" in out


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
        main(["check", "--seeds", "1"])
    assert exc.value.code == 64  # EX_USAGE, as every arca-lab command
    with pytest.raises(SystemExit):
        main(["check", "--shift-gamma", "nan"])
