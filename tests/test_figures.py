"""arca_lab.analysis.figures: every figure rendered from a small sweep, its legends checked against what it draws.

The legend check reads the convention of the figures module docstring: a coloured patch explains a colour, a
grey (NEUTRAL) line or marker a line style / marker whatever its colour, a grey patch a shaded band, any other
line exactly that line. Every drawn line, band and bar must be explained (style and colour) by its panel's
legend and the figure's legends, and every legend entry must be drawn (a panel legend's in that panel).
The sweep is `build_tiny_sweep` (tests/test_verify.py): head-only LoRA at ranks 1 and 2 (uniform credit),
all-linear LoRA at rank 2 (arca); figures the tiny sweep cannot show (an all-linear KL panel, β > 0) are drawn
from small hand-made tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from test_verify import SWEEP_RUNS, build_tiny_sweep

from arca_lab import analysis
from arca_lab.analysis import figures, tables
from arca_lab.sweep import load_sweep

NEUTRAL = to_rgb(figures.NEUTRAL)


# ------------------------------------------------------------------------------------------ legend check
@dataclass(frozen=True)
class Mark:
    kind: str  # "line", "band", "bar" (drawn) or "colour" (legend patch of a colour)
    colour: tuple[float, ...]
    ls: str = "none"
    marker: str = "none"
    hollow: bool = False

    @property
    def style(self) -> tuple[str, str, bool]:
        return (self.ls, self.marker, self.hollow)

    @property
    def neutral(self) -> bool:
        return self.colour == NEUTRAL


def _rgb(color) -> tuple[float, ...]:
    return tuple(round(v, 3) for v in to_rgb(color))


def _none(value) -> str:
    return "none" if value in (None, "", " ", "None", "none") else str(value)


def _line_mark(line: Line2D) -> Mark:
    marker = _none(line.get_marker())
    hollow = marker != "none" and _none(line.get_markerfacecolor()) == "none"
    return Mark("line", _rgb(line.get_color()), _none(line.get_linestyle()), marker, hollow)


def drawn_marks(ax) -> list[Mark]:
    """What a panel draws: its lines (with data), shaded bands and bars."""
    marks = [_line_mark(ln) for ln in ax.get_lines() if ln.get_visible() and len(ln.get_xdata())]
    marks += [
        Mark("band", _rgb(c.get_facecolor()[0])) for c in ax.collections if isinstance(c, PolyCollection)
    ]
    marks += [Mark("bar", _rgb(p.get_facecolor())) for p in ax.patches if isinstance(p, Rectangle)]
    return marks


def legend_entries(legend) -> list[tuple[str, Mark]]:
    out = []
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
        if isinstance(handle, Line2D):
            mark = _line_mark(handle)
        elif isinstance(handle, Patch):
            colour = _rgb(handle.get_facecolor())
            mark = Mark("band", colour) if colour == NEUTRAL else Mark("colour", colour)
        else:
            raise AssertionError(f"unexpected legend handle {handle!r} for {text.get_text()!r}")
        out.append((text.get_text(), mark))
    return out


def _entry_draws(entry: Mark, mark: Mark) -> bool:
    """The legend entry describes this drawn mark (fully, or the aspect it is about)."""
    if entry.kind == "colour":
        return mark.colour == entry.colour
    if entry.kind == "band":
        return mark.kind == "band"
    return (
        mark.kind == "line" and mark.style == entry.style and (entry.neutral or mark.colour == entry.colour)
    )


def legend_problems(fig) -> list[str]:
    """Legend entries not drawn in their scope, drawn marks whose style or colour no legend in scope explains."""
    problems = []
    shared = [e for leg in fig.legends for e in legend_entries(leg)]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    marks = {ax: drawn_marks(ax) for ax in panels}
    everything = [m for ms in marks.values() for m in ms]
    for label, entry in shared:
        if not any(_entry_draws(entry, m) for m in everything):
            problems.append(f"figure legend entry {label!r} is drawn in no panel")
    for ax in panels:
        own = legend_entries(ax.get_legend()) if ax.get_legend() else []
        for label, entry in own:
            if not any(_entry_draws(entry, m) for m in marks[ax]):
                problems.append(f"panel {ax.get_title()[:40]!r}: legend entry {label!r} is not drawn there")
        scope = [e for _, e in shared + own]
        for m in marks[ax]:
            exact = any(not e.neutral and e.kind == "line" and _entry_draws(e, m) for e in scope)
            coloured = exact or any(e.kind == "colour" and e.colour == m.colour for e in scope)
            styled = m.kind == "bar" or any(e.kind != "colour" and _entry_draws(e, m) for e in scope)
            if not (coloured and styled):
                what = "colour" if not coloured else "style"
                problems.append(f"panel {ax.get_title()[:40]!r}: the {what} of {m} is in no legend")
    return problems


def labels(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [label for leg in legends for label, _ in legend_entries(leg)]


def test_legend_check_flags_entries_not_drawn_and_marks_not_explained():
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2], "-o", color="C0")
    ax.fill_between([1, 2], 0, 1, color="C0", alpha=0.2)
    fig.legend(handles=[figures.colour_key("C0", "uniform"), figures.style_key("mean", marker="o")])
    assert legend_problems(fig) == [
        "panel '': the style of Mark(kind='band', colour=(0.122, 0.467, 0.706), ls='none', marker='none', "
        "hollow=False) is in no legend"
    ]
    ax.legend(handles=[figures.band_key("interval"), figures.style_key("max", ls="--", marker="^")])
    assert legend_problems(fig) == ["panel '': legend entry 'max' is not drawn there"]
    ax.plot([1, 2], [3, 3], "-", color="C3")  # a colour no legend names
    assert any("the colour of" in p for p in legend_problems(fig))
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the tiny sweep
@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_sweep(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def tabled(sweep) -> dict:
    """The tables the analysis notebook computes, with the a-posteriori bounds on 2 held-out prompts."""
    cube = load_sweep(sweep)
    points = analysis.run_points(cube, 3)
    bounds, _ = analysis.bounds_table(sweep, cube, prompts=2)
    kl = points.merge(bounds, on=[*analysis.sweep_axes(cube), "run_id"], how="left")
    return dict(
        cube=cube,
        points=points,
        kl=kl,
        gamma=analysis.gamma_table(points),
        regimes=analysis.credit_regimes(cube),
        curves=analysis.curve_means(cube, "reward", by=("credit", "arm")),
        acc=analysis.accuracy_by_rank(points, by=("credit", "arm")),
    )


def render(name: str, t: dict):
    args = {
        "kl_vs_rank": (t["kl"], t["gamma"], analysis.series_axes(t["cube"]), 3),
        "credit_concentration": (t["points"], t["regimes"], analysis.table3_reference, 3),
        "format_mass": (t["points"], 3),
        "reward_accuracy": (
            t["curves"],
            t["acc"],
            t["points"],
            tables.config_values(t["cube"], "pass_k"),
            tables.config_values(t["cube"], "eval_prompts"),
        ),
        "reward_kl_frontier": (t["points"], 3),
    }[name]
    return figures.FIGURES[name][1](*args)


SWEEP_FIGURES = ("kl_vs_rank", "credit_concentration", "format_mass", "reward_accuracy", "reward_kl_frontier")


@pytest.mark.parametrize("name", SWEEP_FIGURES)
def test_every_legend_entry_is_drawn_and_every_mark_explained(tabled, name):
    fig = render(name, tabled)
    assert legend_problems(fig) == []
    drawn = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert all(ax.get_xlabel() for ax in drawn)
    assert all(
        ax.get_ylabel() for ax in drawn if not ax.get_title().startswith("ARCA paper")
    )  # y: its panel's
    plt.close(fig)


def test_kl_vs_rank_on_the_sweep_says_it_is_outside_the_regime(tabled):
    fig = render("kl_vs_rank", tabled)
    (ref, pol) = fig.axes  # one column (only the head arm has 2 ranks), one row per KL direction
    assert (
        "base}\\,\\|\\,\\pi_\\theta" in ref.get_ylabel()
        and "theta\\,\\|\\,\\pi_{\\rm base" in pol.get_ylabel()
    )
    for ax in (
        ref,
        pol,
    ):  # lr 5e-2 over 2 steps: eta*T*sqrt(3 d r_max) far above 0.1 (test_analysis_notebook)
        title = ax.get_title(loc="left")
        assert "pred +1 — OUTSIDE its regime" in title
        assert "outside the theory's regime: eta*T*sqrt(3 d r_max) = " in title and "needs ≤ 0.1" in title
    plt.close(fig)


def test_credit_panels_span_the_whole_range_and_the_paper_keeps_to_its_strip(tabled):
    fig = render("credit_concentration", tabled)
    ranks = sorted({v["rank"] for v in SWEEP_RUNS.values()})
    rank_axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel() == "LoRA rank r"]
    assert len(rank_axes) == 6  # 2 arms x (Gini, ETR, EffN)
    for ax in rank_axes:
        lo, hi = ax.get_ylim()
        assert lo <= 0 and (hi >= 1 or "EffN" in ax.get_title()), ax.get_title()
        assert ax.get_xlim()[1] < 2 * max(ranks)  # the paper's ranks (4, 16, 64) do not stretch the axis
    strips = [ax for ax in fig.axes if ax.get_visible() and "ARCA paper" in ax.get_title()]
    assert len(strips) == 2 and all(ax.get_lines() for ax in strips)  # Gini and ETR, the all-linear arm
    assert {"last batch: mean over its completions"} <= set(labels(fig))
    assert any(lb.startswith("ARCA paper Table 3") for lb in labels(fig))
    plt.close(fig)


def test_format_mass_ticks_are_credit_names(tabled):
    fig = render("format_mass", tabled)
    ticks = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert ticks and set(ticks) <= {"uniform", "arca"}
    plt.close(fig)


def test_reward_accuracy_states_k_and_every_panel_has_its_legend(tabled):
    fig = render("reward_accuracy", tabled)
    assert all(ax.get_legend() is not None for ax in fig.axes)
    assert "pass@2 after training" in fig.axes[2].get_title()  # TINY: pass_k = 2
    assert "4 held-out prompts" in fig.axes[1].get_ylabel()
    plt.close(fig)


def test_reward_kl_frontier_draws_one_point_per_run(tabled):
    fig = render("reward_kl_frontier", tabled)
    points = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert sum(len(ln.get_xdata()) for ln in points) == len(SWEEP_RUNS)
    by_marker = {ln.get_marker() for ln in points if len(ln.get_xdata())}
    assert by_marker == {figures.CREDIT_MARKERS["uniform"], figures.CREDIT_MARKERS["arca"]}
    plt.close(fig)


# ------------------------------------------------------------------------------------ hand-made tables
def _kl_table() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two arms at ranks 1 and 4: bounds only for the head arm; the all-linear arm outside its regime."""
    rows = []
    for arm in ("all", "head"):
        for rank in (1, 4):
            row = dict(arm=arm, alpha_rule="2r", credit="uniform", seed=0, rank=rank)
            for d in analysis.DIRECTIONS:
                row |= {f"{d}_mean": 1e-3 * rank, f"{d}_max": 1e-2 * rank, f"heldout_{d}_max": 2e-2 * rank}
                row |= {f"apriori_{d}": 1.0 * rank, f"aposteriori_{d}": 0.1 * rank} if arm == "head" else {}
            rows.append(row | {"lemma_max_k_range": 0.05 * rank})
    gamma = pd.DataFrame(
        [
            dict(
                arm=arm,
                alpha_rule="2r",
                credit="uniform",
                direction=d,
                gamma_pred=1.0,
                gamma_fit=1.0,
                lo=math.nan,
                hi=math.nan,
                n_seeds=1,
                regime_check=check,
            )
            for arm, check in (("all", "eta*T*sqrt(3 d r_max): 2.7 <= 0.1"), ("head", "ok"))
            for d in analysis.DIRECTIONS
        ]
    )
    return pd.DataFrame(rows), gamma


def test_kl_panels_name_their_regime_and_legend_only_the_bounds_they_draw():
    kl, gamma = _kl_table()
    fig = figures.kl_vs_rank(kl, gamma)
    assert legend_problems(fig) == []
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    top = {
        t.split(",")[0]: ax for t, ax in zip(titles[:2], fig.axes[:2], strict=True)
    }  # row 1: KL(base||theta)
    full, head = top["all-linear LoRA"], top["head-only LoRA (lm_head)"]
    full_title, head_title = full.get_title(loc="left"), head.get_title(loc="left")
    assert "uniform: fit γ +1.00 (no CI, 1 seed(s)), pred +1 — OUTSIDE its regime" in full_title
    assert "outside the theory's regime: eta*T*sqrt(3 d r_max) = 2.7, needs ≤ 0.1" in full_title
    assert "(inside its regime)" in head_title and "OUTSIDE" not in head_title
    full_labels = [lb for lb, _ in legend_entries(full.get_legend())]
    head_labels = [lb for lb, _ in legend_entries(head.get_legend())]
    assert not any("a-priori" in lb or "a-posteriori" in lb for lb in full_labels)
    assert any("a-priori" in lb for lb in head_labels) and any("a-posteriori" in lb for lb in head_labels)
    plt.close(fig)


def test_beta_comparison_legends_and_skip_note(tmp_path, capsys):
    beta = pd.DataFrame(
        dict(
            beta=[0.0, 0.0, 0.05, 0.05],
            rank=[1, 4, 1, 4],
            arm=["all"] * 4,
            acc_after=[0.5, 0.6, 0.5, 0.55],
            step_time=[1.0, 1.1, 1.2, 1.3],
        )
    )
    fig = figures.beta_comparison(beta)
    assert legend_problems(fig) == [] and all(ax.get_legend() for ax in fig.axes)
    plt.close(fig)
    assert figures.draw("beta_comparison", tmp_path, None) == []
    assert "no runs at beta > 0 beside runs at beta = 0: beta figure skipped" in capsys.readouterr().out
    paths = figures.draw("beta_comparison", tmp_path, beta)
    assert [p.name for p in paths] == ["beta_comparison.png", "beta_comparison.svg"]
    assert all(p.stat().st_size > 5_000 for p in paths)
    plt.close("all")


def test_regime_text_and_config_values(tabled):
    assert figures.regime_text("a: 2 <= 1; b: 0.5 >= 1") == "a = 2, needs ≤ 1; b = 0.5, needs ≥ 1"
    assert figures.regime_text("free text") == "free text"
    cube = tabled["cube"]
    assert tables.config_values(cube, "pass_k") == [2]
    assert tables.config_values(cube, "target_modules") == ["all-linear", "lm_head"]  # varies over the grid
    assert tables.config_values(cube, "no_such_field") == []
    assert np.isfinite(tabled["points"]["kl_ref_policy_mean"]).all()
