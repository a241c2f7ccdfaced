"""The analysis notebook's figures, drawn from `arca_lab.analysis.tables` DataFrames (one function per figure).

`notebooks/rank_sweep_analysis.ipynb` calls `draw(name, figures_dir, ...)` per figure; each figure function
returns a matplotlib Figure, or raises `NothingToDraw` when the sweep lacks what it needs (one rank, no β > 0
runs, ...). Names and meanings of the plotted numbers are README "What each number means"; the axis labels
repeat them so a saved PNG reads without the notebook.

Legends follow one convention, which tests/test_figures.py checks on every figure. An entry is one of
- a coloured patch: "this colour means X" (a credit, a rank, a β), for any line, marker, band or bar;
- a grey (`NEUTRAL`) line or marker: "this line style / marker means X", whatever its colour;
- a grey patch: "a shaded band means X";
- a line in another colour (e.g. the black "before training" line): exactly that line.
Every drawn line, band and bar is explained by its panel's legend and the figure's legends, and every entry is
drawn: an entry of a panel legend in that panel, an entry of a figure legend in some panel.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from arca_lab.analysis.tables import kl_rank_panels, predicted_line, save_figure, series_label

NEUTRAL = "0.55"
"""Colour of legend entries that explain a line style, marker or band whatever its colour (never a data colour)."""
PALETTE = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]  # tab10 without its grey (C7 ~ NEUTRAL)
CREDIT_COLORS = {
    "uniform": "C0",
    "surprisal": "C1",
    "entropy_reduction": "C2",
    "divergence": "C3",
    "arca": "C4",
    "arca_branch": "C5",
}
CREDIT_MARKERS = {
    "uniform": "o",
    "surprisal": "s",
    "entropy_reduction": "^",
    "divergence": "v",
    "arca": "D",
    "arca_branch": "P",
}
ARM_NAMES = {"all": "all-linear LoRA", "head": "head-only LoRA (lm_head)"}
ARM_STYLES = ("-", "--", "-.", ":")
KL_NAMES = {
    "kl_ref_policy": r"KL($\pi_{\rm base}\,\|\,\pi_\theta$)",
    "kl_policy_ref": r"KL($\pi_\theta\,\|\,\pi_{\rm base}$)",
}
"""The two exact per-token KL directions of run.nc (kl_ref_policy is MERL's, the one γ is predicted for)."""


class NothingToDraw(Exception):
    """The sweep lacks what a figure needs; the message says what (printed instead of the figure)."""


# ------------------------------------------------------------------------------------------------ helpers
def _arm(arm: str) -> str:
    return ARM_NAMES.get(arm, f"arm {arm}")


def _colors(labels: Iterable[str]) -> dict[str, str]:
    """Credits keep their colour in every figure; anything else (β, "credit, beta=…") takes the palette in order."""
    labels = list(dict.fromkeys(labels))
    if all(lb in CREDIT_COLORS for lb in labels):
        return {lb: CREDIT_COLORS[lb] for lb in labels}
    return {lb: PALETTE[i % len(PALETTE)] for i, lb in enumerate(sorted(labels, key=str))}


def _rank_colors(ranks: Iterable[Any]) -> dict[int, tuple[float, ...]]:
    """A sequential colour per rank (small: dark, large: light), the same rank order in every figure."""
    ranks = sorted({int(r) for r in ranks})
    cmap = plt.get_cmap("viridis")
    return {r: cmap(0.85 * i / max(len(ranks) - 1, 1)) for i, r in enumerate(ranks)}


def _credit_order(credits: Iterable[str]) -> list[str]:
    """Distinct credits in CREDIT_COLORS order (uniform first), unknown ones after it, alphabetically."""
    known = list(CREDIT_COLORS)
    return sorted(set(credits), key=lambda c: (known.index(c) if c in known else len(known), str(c)))


def _markers(credits: Iterable[str]) -> dict[str, str]:
    spare = iter(["X", "h", "p", "*", "<", ">"])
    return {c: CREDIT_MARKERS.get(c) or next(spare) for c in dict.fromkeys(credits)}


def _arm_styles(arms: Iterable[str]) -> dict[str, str]:
    return {a: ARM_STYLES[i % len(ARM_STYLES)] for i, a in enumerate(sorted(set(arms)))}


def _rank_axis(ax: Axes, ranks: Iterable[Any]) -> None:
    """Log rank axis with a tick at every rank of the sweep, labelled as an integer, and nothing else."""
    ranks = sorted({int(r) for r in ranks})
    ax.set_xscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(ranks[0] / 1.35, ranks[-1] * 1.35)
    ax.set_xlabel("LoRA rank r")


def _log_x(ax: Axes) -> None:
    """Log x axis labelled at 1, 2, 5 × 10^k in plain numbers ("0.0002"), no minor labels (they overlap)."""
    ax.set_xscale("log")
    axis = ax.xaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    axis.set_minor_formatter(NullFormatter())


def colour_key(color: Any, label: str) -> Patch:
    """Legend entry: this colour means `label`."""
    return Patch(facecolor=color, edgecolor="none", label=label)


def style_key(label: str, ls: str = "-", marker: str = "none", hollow: bool = False, **kw: Any) -> Line2D:
    """Legend entry: this line style / marker means `label`, whatever its colour."""
    mfc = "none" if hollow else NEUTRAL
    return Line2D([], [], color=NEUTRAL, ls=ls, marker=marker, mfc=mfc, label=label, **kw)


def band_key(label: str) -> Patch:
    """Legend entry: a shaded band means `label`."""
    return Patch(facecolor=NEUTRAL, alpha=0.35, edgecolor="none", label=label)


def _legend_below(fig: Figure, handles: Sequence[Any], ncol: int, **kw: Any) -> None:
    if handles:
        fig.legend(handles=list(handles), loc="outside lower center", ncol=ncol, fontsize=8, **kw)


# ------------------------------------------------------------------------------------------------ kl_vs_rank
BOUND_STYLES = {
    "heldout_{d}_max": ("x", "held-out max per token, final adapter (verify-bound)"),
    "apriori_{d}": ("s", "a-priori bound (hyper-parameters and ‖A₀‖ only)"),
    "aposteriori_{d}": ("D", "a-posteriori ball bound (trained ΔW, ‖x‖ ≤ R)"),
    "lemma_max_k_range": ("+", "max_t K(range(z_t)): lemma on the measured shift, not a bound"),
}
"""kl_vs_rank, dash-dot lines: column of the bounds table (d = KL direction) -> (marker, legend label)."""

_INEQUALITY = re.compile(r"^(?P<name>.+): (?P<lhs>\S+) (?P<op><=|>=|==) (?P<rhs>\S+)$")


def regime_text(regime_check: str) -> str:
    """ "eta*T*sqrt(3 d r_max): 2.7 <= 0.1" (a failing inequality of `tables.hyperparameter_regime`) as
    "eta*T*sqrt(3 d r_max) = 2.7, needs ≤ 0.1"; several are joined by "; "."""
    out = []
    for part in filter(None, (p.strip() for p in regime_check.split(";"))):
        m = _INEQUALITY.match(part)
        op = {"<=": "≤", ">=": "≥", "==": "="}.get(m["op"]) if m else None
        out.append(f"{m['name']} = {m['lhs']}, needs {op} {m['rhs']}" if m else part)
    return "; ".join(out)


def _gamma_rows(
    gamma: pd.DataFrame, arm: str, rule: str, direction: str, series_by: Sequence[str]
) -> dict[str, Any]:
    if not len(gamma):
        return {}
    sel = gamma[(gamma.arm == arm) & (gamma.alpha_rule == rule) & (gamma.direction == direction)]
    return {series_label(series_by, [getattr(r, c) for c in series_by]): r for r in sel.itertuples()}


def panel_title(
    gamma: pd.DataFrame, arm: str, rule: str, direction: str, series_by: Sequence[str], labels: Sequence[str]
) -> str:
    """Title of one KL-vs-rank panel: arm and α rule; per line "label: fit γ … pred γ", flagged "outside its
    regime" when the hyper-parameters fail the theory's regime (then a line says which inequality fails)."""
    lines = [f"{_arm(arm)}, alpha rule {rule}: {KL_NAMES[direction]}"]
    rows = _gamma_rows(gamma, arm, rule, direction, series_by)
    failing = []
    for label in labels:
        r = rows.get(label)
        if r is None:
            continue
        if math.isfinite(r.gamma_fit):
            ci = f"[{r.lo:+.2f}, {r.hi:+.2f}]" if math.isfinite(r.lo) else f"(no CI, {r.n_seeds} seed(s))"
            fit = f"fit γ {r.gamma_fit:+.2f} {ci}"
        else:
            fit = "no fit"
        pred = f"pred {r.gamma_pred:+.2g}" if math.isfinite(r.gamma_pred) else "no prediction"
        check = getattr(r, "regime_check", "")
        flag = "" if not check else " (inside its regime)" if check == "ok" else " — OUTSIDE its regime"
        if check and check != "ok":
            failing += regime_text(check).split("; ")
        lines.append(f"{label}: {fit}, {pred}{flag}")
    for text in dict.fromkeys(failing):
        lines.append(f"outside the theory's regime: {text}")
    if arm != "head" and any(math.isfinite(r.gamma_pred) for r in rows.values()):
        lines.append("pred: single-layer theory, a reference for this arm")
    return "\n".join(lines)


def _coinciding(values: dict[str, pd.Series]) -> list[list[str]]:
    """Groups of lines with equal values (e.g. ARCA and uniform under a head-only adapter): drawn on top of
    each other, so the title names them."""
    groups: list[list[str]] = []
    for label, v in values.items():
        for g in groups:
            w = values[g[0]]
            if v.index.equals(w.index) and np.allclose(v.values, w.values, rtol=1e-9, atol=0, equal_nan=True):
                g.append(label)
                break
        else:
            groups.append([label])
    return [g for g in groups if len(g) > 1]


def _overlap_note(values: dict[str, pd.Series], width: int = 90) -> str:
    """Title lines naming the lines drawn over each other ("" when none are), wrapped at `width`."""
    groups = _coinciding(values)
    if not groups:
        return ""
    text = "drawn over each other (equal values): " + "; ".join(" = ".join(g) for g in groups)
    return "\n" + textwrap.fill(text, width)


def kl_vs_rank(
    kl: pd.DataFrame, gamma: pd.DataFrame, series_by: Sequence[str] = ("credit",), last_steps: int = 3
) -> Figure:
    """Measured KL per token vs LoRA rank: one column per (arm, α rule) with 2 or more ranks, one row per KL
    direction; colour = credit (and any extra axis such as β); per line the training probe's mean and max, the
    predicted slope r^γ, and where measured the held-out max, the bounds and the lemma."""
    panels = kl_rank_panels(kl, gamma, series_by)
    if not panels:
        raise NothingToDraw("no arm and alpha rule with 2 or more ranks")
    labels = [lb for lines in panels.values() for lb in lines]
    colors = _colors(_credit_order(labels) if all(lb in CREDIT_COLORS for lb in labels) else labels)
    fig, axs = plt.subplots(
        2, len(panels), figsize=(5.6 * len(panels), 10.5), squeeze=False, layout="constrained"
    )
    drawn_pred = drawn_max = False
    for col, ((arm, rule), lines) in enumerate(panels.items()):
        ranks = sorted({r for m in lines.values() for r in m.index})
        for ax, d in zip(axs[:, col], ("kl_ref_policy", "kl_policy_ref"), strict=True):
            bounds_here: dict[str, tuple[str, str]] = {}
            for label, m in lines.items():
                c = colors[label]
                ax.plot(m.index, m[f"{d}_mean"], "-o", color=c, lw=2)
                if m[f"{d}_max"].notna().any():
                    ax.plot(m.index, m[f"{d}_max"], "--^", color=c, lw=1, alpha=0.6)
                    drawn_max = True
                pred = m.attrs.get("gamma_pred", math.nan)
                if math.isfinite(pred) and (m[f"{d}_mean"] > 0).all():
                    ax.plot(m.index, predicted_line(m.index, m[f"{d}_mean"], pred), ":", color=c, lw=1.5)
                    drawn_pred = True
                for pattern, (marker, name) in BOUND_STYLES.items():
                    column = pattern.format(d=d)
                    if column in m and m[column].notna().any():
                        ax.plot(m.index, m[column], marker=marker, ls="-.", lw=1, ms=7, color=c)
                        bounds_here[column] = (marker, name)
            title = panel_title(gamma, arm, rule, d, series_by, list(lines))
            title += _overlap_note({lb: m[f"{d}_mean"] for lb, m in lines.items()})
            ax.set_title(title, fontsize=8, loc="left")
            ax.set_yscale("log")
            ax.set_ylabel(f"{KL_NAMES[d]} per token (nats)")
            _rank_axis(ax, ranks)
            if bounds_here:
                handles = [style_key(name, ls="-.", marker=mk) for mk, name in bounds_here.values()]
                ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    handles = [colour_key(colors[lb], lb) for lb in colors]
    handles.append(style_key(f"mean per token over the probe rows, last {last_steps} steps", marker="o"))
    if drawn_max:
        handles.append(style_key("max per token over the probe rows and all steps", ls="--", marker="^"))
    if drawn_pred:
        handles.append(style_key("predicted slope r^γ (drawn through the means)", ls=":"))
    _legend_below(fig, handles, ncol=3, title="training probe (run.nc); colour: " + ", ".join(series_by))
    return fig


# ------------------------------------------------------------------------------------ credit_concentration
CREDIT_PANELS = {
    "gini": ("Gini of the credit weights", "Gini (0: uniform, 1: one token)"),
    "etr": ("ETR = EffN / T", "ETR (1: uniform)"),
    "effn": ("EffN = (Σw)² / Σw²", "EffN (tokens; T for uniform)"),
}


def _dodged(
    table: pd.DataFrame, key: str, order: Sequence[Any], spread: float = 1.07
) -> dict[tuple[Any, int], float]:
    """x position per (`key` value, rank): the rank, times a small factor where several values share that rank,
    so their markers sit side by side on the log axis instead of on top of each other (a value alone at a rank
    sits on its tick)."""
    out = {}
    for rank, g in table.groupby("rank"):
        here = [v for v in order if v in set(g[key])]
        for i, v in enumerate(here):
            out[(v, int(rank))] = float(rank) * spread ** (i - (len(here) - 1) / 2)
    return out


def _credit_lines(panel: dict[str, Axes], m: pd.DataFrame, color: str, x: np.ndarray) -> bool:
    """One credit's Gini / ETR / EffN per rank (`m`: rank-indexed means) and, when the regimes are known, the
    last batch (hollow), the interval its score ranges allow (a box per rank) and EffN's predicted minimum;
    True if the regime marks were drawn. `x`: where each rank is drawn (`_dodged`)."""
    for k in ("gini", "etr", "effn"):
        panel[k].plot(x, m[k], "-o", color=color, lw=2)
    if "gini_pred_hi" not in m or m["gini_pred_hi"].isna().all():
        return False
    for k in ("gini", "etr", "effn"):
        panel[k].plot(x, m[f"{k}_last_batch"], "o", mfc="none", ms=10, mew=1.5, color=color)
    for xi, hi, lo in zip(x, m["gini_pred_hi"], m["etr_pred_lo"], strict=True):
        box = [xi / 1.025, xi * 1.025]  # the interval is per run: a box at its rank, not a band between ranks
        panel["gini"].fill_between(box, 0, hi, color=color, alpha=0.2)
        panel["etr"].fill_between(box, lo, 1, color=color, alpha=0.2)
    panel["effn"].plot(x, m["effn_pred_lo"], ":", marker="_", ms=14, mew=2, color=color)
    return True


def _paper_strip(strip: Axes, column: int, paper: dict[str, list], colors: dict[str, str]) -> None:
    """ARCA paper Table 3 (column 1: Gini, 2: ETR) at its own ranks, one slot per rank, credits side by side."""
    ranks = sorted({r for rows in paper.values() for r, _, _ in rows})
    offsets = {c: 0.16 * (i - (len(paper) - 1) / 2) for i, c in enumerate(paper)}
    for credit, rows in paper.items():
        for r, *values in rows:
            x = ranks.index(r) + offsets[credit]
            strip.plot(x, values[column - 1], "*", ms=12, color=colors[credit], mec="k", mew=0.5)
    strip.set_xticks(range(len(ranks)), [f"r={r}" for r in ranks], fontsize=7)
    strip.set_xlim(-0.6, len(ranks) - 0.4)
    strip.set_title("ARCA paper\nTable 3", fontsize=8)
    strip.set_xlabel("its rank", fontsize=8)
    strip.tick_params(labelleft=False)


def credit_concentration(
    points: pd.DataFrame,
    regimes: pd.DataFrame,
    reference: Callable[[str], list[tuple[int, float, float]]],
    last_steps: int = 3,
) -> Figure:
    """Gini, ETR and EffN per credit vs rank, one row per arm, beside the interval `predict_regime` allows for
    the last batch's score ranges and (all-linear arm) the ARCA paper's Table 3 in a strip of its own, so its
    ranks do not stretch the sweep's rank axis. `reference(credit)` gives the paper's (rank, Gini, ETR) rows.
    Every panel spans its quantity's whole range (Gini and ETR 0 to 1, EffN from 0): no noise is zoomed into."""
    if points[["gini", "etr", "effn"]].isna().all().all():
        raise NothingToDraw("no credit diagnostics in this sweep")
    if len(regimes):  # one row per run in both: join on run_id, the grid axes come from `points`
        regimes = regimes.drop(columns=[c for c in regimes if c in points and c != "run_id"])
        cr = points.merge(regimes, on="run_id")
    else:
        cr = points
    arms, credits = sorted(set(cr["arm"])), _credit_order(cr["credit"])
    colors = _colors(credits)
    paper = {c: reference(c) for c in credits if reference(c)} if "all" in arms else {}
    kinds = ["gini", "paper", "etr", "paper", "effn"] if paper else ["gini", "etr", "effn"]
    fig, axs = plt.subplots(
        len(arms),
        len(kinds),
        figsize=(16.5, 3.9 * len(arms) + 1.2),
        squeeze=False,
        layout="constrained",
        gridspec_kw=dict(width_ratios=[0.9 if k == "paper" else 4 for k in kinds]),
    )
    regime_marks = False
    effn_top = np.nanmax(np.r_[cr["effn"].values, cr.get("effn_last_batch", cr["effn"]).values, 1])
    for row, arm in zip(axs, arms, strict=True):
        panel = {k: ax for k, ax in zip(kinds, row, strict=True) if k != "paper"}
        sub = cr[cr["arm"] == arm]
        where = _dodged(sub, "credit", credits)
        for credit, g in sub.groupby("credit"):
            m = g.groupby("rank").mean(numeric_only=True)
            x = np.array([where[(credit, int(r))] for r in m.index])
            regime_marks |= _credit_lines(panel, m, colors[credit], x)
        for k, (name, ylabel) in CREDIT_PANELS.items():
            _rank_axis(panel[k], sorted(set(sub["rank"])))
            panel[k].set_ylabel(ylabel)
            panel[k].set_title(f"{name}, {_arm(arm)}", fontsize=9)
        panel["gini"].set_ylim(-0.03, 1.03)
        panel["etr"].set_ylim(0, 1.05)
        panel["effn"].set_ylim(0, 1.08 * effn_top)
        if arm == "head" and "arca" in set(sub["credit"]):
            panel["gini"].set_title(
                f"Gini of the credit weights, {_arm(arm)}\n(ARCA is uniform credit here: a head-only adapter "
                "leaves the hidden states unchanged)",
                fontsize=8,
            )
        strips = [ax for k, ax in zip(kinds, row, strict=True) if k == "paper"]
        for strip, left, column in zip(strips, ("gini", "etr"), (1, 2), strict=True):
            strip.sharey(panel[left])
            if arm == "all":  # the ARCA paper adapted all linear layers
                _paper_strip(strip, column, paper, colors)
            else:
                strip.set_visible(False)
    handles = [colour_key(colors[c], c) for c in credits]
    handles.append(style_key(f"mean of the per-step value over the last {last_steps} steps", marker="o"))
    if regime_marks:
        handles += [
            style_key("last batch: mean over its completions", ls="none", marker="o", hollow=True),
            band_key("interval the last batch's score ranges allow (predict_regime)"),
            style_key("smallest EffN those score ranges allow", ls=":", marker="_"),
        ]
    if paper:
        label = "ARCA paper Table 3 at its rank (Qwen3-1.7B-Base on MATH: another model and task)"
        handles.append(style_key(label, ls="none", marker="*"))
    title = (
        "colour: credit (side by side at a shared rank); training batches (run.nc credit_gini, _etr, _effn)"
    )
    _legend_below(fig, handles, ncol=3, title=title)
    return fig


# --------------------------------------------------------------------------------------------- format_mass
def format_mass(points: pd.DataFrame, last_steps: int = 3) -> Figure:
    """Credit mass on format tokens (separators, markers, end of sequence) per credit and rank, one panel per
    arm: the sum of a completion's weights over those tokens, mean over completions and the last steps."""
    fm = points.dropna(subset=["format_mass"])
    if fm.empty:
        raise NothingToDraw("no token roles recorded")
    arms = sorted(set(fm["arm"]))
    rank_colors = _rank_colors(fm["rank"])
    fig, axs = plt.subplots(
        1, len(arms), figsize=(5.5 * len(arms), 4.4), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, arm in zip(axs[0], arms, strict=True):
        table = fm[fm["arm"] == arm].pivot_table(index="credit", columns="rank", values="format_mass")
        table = table.loc[_credit_order(table.index)]
        width = 0.8 / len(table.columns)
        for i, rank in enumerate(table.columns):
            x = np.arange(len(table)) + (i - (len(table.columns) - 1) / 2) * width
            ax.bar(x, table[rank].values, width, color=rank_colors[int(rank)])
        long = any(len(str(c)) > 9 for c in table.index)  # entropy_reduction would run into its neighbours
        ax.set_xticks(
            range(len(table)), list(table.index), rotation=20 if long else 0, ha="right" if long else "center"
        )
        ax.set_xlabel("credit")
        ax.set_title(_arm(arm), fontsize=10)
    axs[0, 0].set_ylabel(f"credit mass on format tokens\n(last-{last_steps}-steps mean per completion)")
    fig.suptitle(
        "Share of each completion's credit on format tokens; uniform credit puts exactly their share of the "
        "length there",
        fontsize=10,
    )
    handles = [colour_key(c, f"rank r = {r}") for r, c in rank_colors.items()]
    _legend_below(fig, handles, ncol=len(handles), title="LoRA rank")
    return fig


# ----------------------------------------------------------------------------------------- reward_accuracy
def _value_text(values: Sequence[Any]) -> str:
    return "/".join(str(v) for v in values) if len(values) else "?"


def reward_accuracy(
    curves: pd.DataFrame,
    accuracy: pd.DataFrame,
    points: pd.DataFrame,
    pass_k: Sequence[int] = (),
    eval_prompts: Sequence[int] = (),
) -> Figure:
    """Reward per step (`tables.curve_means`) and greedy accuracy / pass@k after training vs rank
    (`tables.accuracy_by_rank`); colour = credit, line style = arm, each line a mean over the other axes;
    `pass_k`, `eval_prompts`: the sweep's k of pass@k and number of held-out prompts (for the labels)."""
    if curves.empty:
        raise NothingToDraw("no reward curves")
    colors = _colors(_credit_order(points["credit"]))
    styles = _arm_styles(points["arm"])
    fig, axs = plt.subplots(1, 3, figsize=(17, 5.4), layout="constrained")
    lines: dict[str, pd.Series] = {}
    for (credit, arm), g in curves.groupby(["credit", "arm"]):
        axs[0].plot(g["step"], g["mean"], styles[arm], color=colors[credit], lw=1.8)
        lines[f"{credit} ({arm})"] = g.set_index("step")["mean"]
    axs[0].set(xlabel="optimiser step", ylabel="reward: mean over the step's completions")
    axs[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    title = "reward per step (mean over ranks, seeds, alpha rules)"
    axs[0].set_title(title + _overlap_note(lines), fontsize=9)
    k, n = _value_text(pass_k), _value_text(eval_prompts)
    names = {
        "acc": ("greedy accuracy", f"greedy accuracy after training\n(fraction of {n} held-out prompts)"),
        "pass": (f"pass@{k}", f"pass@{k} after training: ≥1 of {k} samples correct\n({n} held-out prompts)"),
    }
    series = [(c, a) for c in colors for a in styles]
    keyed = accuracy.assign(series=list(zip(accuracy["credit"], accuracy["arm"], strict=True)))
    where = _dodged(keyed, "series", series, spread=1.04)  # equal accuracies side by side, not hidden
    for ax, col in zip(axs[1:], ("acc", "pass"), strict=True):
        for (credit, arm), g in accuracy.groupby(["credit", "arm"]):
            x = [where[((credit, arm), int(r))] for r in g["rank"]]
            ax.plot(x, g[f"{col}_after"], styles[arm], marker="o", color=colors[credit], lw=1.8)
        ax.axhline(points[f"{col}_before"].mean(), color="k", lw=1)
        ax.set_ylabel(names[col][1])
        ax.set_title(f"{names[col][0]} after training (mean over seeds, alpha rules)", fontsize=9)
        _rank_axis(ax, accuracy["rank"])
    for ax in axs:
        handles = [colour_key(colors[c], c) for c in colors]
        handles += [
            style_key(_arm(a), ls=ls, marker="o" if ax is not axs[0] else "none") for a, ls in styles.items()
        ]
        if ax is not axs[0]:
            handles.append(Line2D([], [], color="k", lw=1, label="before training (base model)"))
        ax.legend(handles=handles, fontsize=7, loc="best")
    return fig


# ----------------------------------------------------------------------------------------- beta_comparison
def beta_comparison(beta: pd.DataFrame | None) -> Figure:
    """Greedy accuracy after training and seconds per optimiser step vs rank, per β and arm (`tables.beta_table`)."""
    if beta is None or beta.empty:
        raise NothingToDraw("no runs at beta > 0 beside runs at beta = 0")
    colors = _colors([f"beta {b:g}" for b in sorted(set(beta["beta"]))])
    styles = _arm_styles(beta["arm"])
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    titles = ("greedy accuracy after training", "seconds per optimiser step (run.nc step_time)")
    for ax, col, title in zip(axs, ("acc_after", "step_time"), titles, strict=True):
        lines = {}
        for (b, arm), g in beta.groupby(["beta", "arm"]):
            ax.plot(g["rank"], g[col], styles[arm], marker="o", color=colors[f"beta {b:g}"])
            lines[f"beta {b:g} ({arm})"] = g.set_index("rank")[col]
        _rank_axis(ax, beta["rank"])
        ax.set_ylabel(title)
        ax.set_title(f"KL penalty beta > 0 vs beta = 0 (mean over seeds){_overlap_note(lines)}", fontsize=9)
        handles = [colour_key(c, lb) for lb, c in colors.items()]
        handles += [style_key(_arm(a), ls=ls, marker="o") for a, ls in styles.items()]
        ax.legend(handles=handles, fontsize=7)
    axs[1].set_ylim(bottom=0)  # a time: its ratio between the arms is what matters
    return fig


# -------------------------------------------------------------------------------------- reward_kl_frontier
def reward_kl_frontier(points: pd.DataFrame, last_steps: int = 3) -> Figure:
    """Final reward against KL(π_base‖π_θ) per token, one point per run: colour = rank, marker = credit; one
    panel per arm (columns) and α rule (rows), since the arms' KLs lie orders of magnitude apart."""
    p = points[(points["kl_ref_policy_mean"] > 0) & points["reward"].notna()]
    if p.empty:
        raise NothingToDraw("no run with a positive KL and a reward")
    arms, rules = sorted(set(p["arm"])), sorted(set(p["alpha_rule"]))
    rank_colors = _rank_colors(p["rank"])
    markers = _markers(_credit_order(p["credit"]))
    # later credits smaller, so runs with equal numbers (ARCA = uniform on a head-only adapter) stay visible
    sizes = {c: max(13 - 3.5 * i, 5) for i, c in enumerate(markers)}
    fig, axs = plt.subplots(
        len(rules),
        len(arms),
        figsize=(6 * len(arms), 4.5 * len(rules) + 0.8),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for row, rule in zip(axs, rules, strict=True):
        for ax, arm in zip(row, arms, strict=True):
            sub = p[(p["arm"] == arm) & (p["alpha_rule"] == rule)]
            # credits in marker-size order: large markers first, smaller ones on top of them
            for credit, rank in [(c, r) for c in markers for r in sorted(set(sub["rank"]))]:
                g = sub[(sub["credit"] == credit) & (sub["rank"] == rank)]
                if g.empty:
                    continue
                ax.plot(
                    g["kl_ref_policy_mean"],
                    g["reward"],
                    ls="none",
                    marker=markers[credit],
                    ms=sizes[credit],
                    color=rank_colors[int(rank)],
                    mec="k",
                    mew=0.5,
                )
            _log_x(ax)
            ax.set_title(f"{_arm(arm)}, alpha rule {rule}" + ("" if len(sub) else ": no runs"), fontsize=10)
            ax.set_xlabel(
                f"{KL_NAMES['kl_ref_policy']} per token, last-{last_steps}-steps mean (training probe)"
            )
            ax.set_ylabel(f"reward, mean over the last {last_steps} steps")
            ax.grid(alpha=0.3)
    handles = [colour_key(c, f"rank r = {r}") for r, c in rank_colors.items()]
    handles += [style_key(credit, ls="none", marker=m, ms=sizes[credit]) for credit, m in markers.items()]
    _legend_below(
        fig, handles, ncol=min(len(handles), 6), title="one point per run; colour: LoRA rank; marker: credit"
    )
    return fig


# --------------------------------------------------------------------------------------------------- draw
FIGURES: dict[str, tuple[str, Callable[..., Figure]]] = {
    "kl_vs_rank": ("KL-vs-rank", kl_vs_rank),
    "credit_concentration": ("credit", credit_concentration),
    "format_mass": ("format-mass", format_mass),
    "reward_accuracy": ("reward", reward_accuracy),
    "beta_comparison": ("beta", beta_comparison),
    "reward_kl_frontier": ("reward-KL frontier", reward_kl_frontier),
}
"""Figure name (its file name) -> (what the skip note calls it, the function that draws it)."""


def draw(name: str, figures_dir: str | Path, *args: Any, **kwargs: Any) -> list[Path]:
    """Draw figure `name` and save it as `name`.png and .svg in `figures_dir`; returns the paths, or prints why
    the sweep cannot draw it ("...: KL-vs-rank figure skipped") and returns []. The figure stays open, so a
    notebook shows it below the cell."""
    label, function = FIGURES[name]
    try:
        fig = function(*args, **kwargs)
    except NothingToDraw as why:
        print(f"{why}: {label} figure skipped")
        return []
    return save_figure(fig, figures_dir, name)
