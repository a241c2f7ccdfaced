"""Sweep grids: axes, the union of Cartesian sub-grids, sweep presets, matched budgets and the cost model.

A `Grid` is shared config values (a RunConfig preset plus `--set` overrides) and a list of sub-grids, each a
Cartesian product over the sweep axes `AXES` (+ optional extra axes over other RunConfig fields). The grid's
points are the union of the sub-grids' points, in order, without repeats. `arm` and `alpha_rule` map to
RunConfig fields through `ARMS` and `ALPHA_RULES` (the one place that mapping lives). The cost model that sized the presets is
`arca_lab.sweep.cost` (re-exported here).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from arca_lab.config import RunConfig, make_config
from arca_lab.credit import CREDITS
from arca_lab.rollout.correction import CORRECTIONS
from arca_lab.sweep.cost import COST as COST
from arca_lab.sweep.cost import default_threads as default_threads
from arca_lab.sweep.cost import estimate_run_seconds as estimate_run_seconds
from arca_lab.sweep.cost import estimate_seconds as estimate_seconds

AXES = ("rank", "credit", "seed", "arm", "alpha_rule")
"""The sweep axes every grid point (and every `sweep.nc`) has, in this order."""
ARMS = {"all": "all-linear", "head": "lm_head"}
"""arm -> RunConfig.target_modules: every linear layer but the output layer, or head-only LoRA."""
FIXED_ALPHA = 16
"""lora_alpha of alpha_rule "fixed": the same number for every rank (so the scale alpha/r falls with r)."""
ALPHA_RULES = {"2r": "2r", "r": "r", "fixed": str(FIXED_ALPHA)}
"""alpha_rule -> RunConfig.alpha: "2r" (ARCA paper), "r" (MERL), "fixed" (FIXED_ALPHA for every rank). Other
rules: "<k>r" (alpha = k * rank) and "fixed<N>" (alpha = N for every rank), see `alpha_of`."""


def alpha_of(rule: str) -> str:
    """RunConfig.alpha of an alpha rule: "2r" -> "2r", "fixed" -> "16", "fixed32" -> "32"."""
    if rule in ALPHA_RULES:
        return ALPHA_RULES[rule]
    if re.fullmatch(r"(\d+(\.\d*)?)?r", rule):
        return rule
    match = re.fullmatch(r"fixed(\d+(\.\d*)?)", rule)
    if match and float(match.group(1)) > 0:
        return match.group(1)
    raise ValueError(
        f"alpha_rule {rule!r} is not valid: choose from {list(ALPHA_RULES)}, a rank multiple like '4r', or "
        "a fixed alpha like 'fixed32'"
    )


def rule_of(alpha: str) -> str:
    """Inverse of `alpha_of`: "2r" -> "2r", "16" -> "fixed", "32" -> "fixed32"."""
    canonical = {v: k for k, v in ALPHA_RULES.items()}
    return canonical.get(alpha, alpha if alpha.endswith("r") else f"fixed{alpha}")


AXIS_FLAGS = {
    "rank": "--ranks",
    "credit": "--credits",
    "seed": "--seeds",
    "arm": "--arms",
    "alpha_rule": "--alpha-rules",
}
"""Command-line flag of each sweep axis."""
MANAGED = ("rank", "credit", "seed", "target_modules", "alpha", "out", "overwrite")
"""RunConfig fields the sweep sets per grid point; `--set` may not touch them."""
NOT_COMPARED = ("threads",)
"""Shared values that may differ between invocations of the same sweep (they do not change results)."""


# ----------------------------------------------------------------------------------------- value parsing
def parse_field_value(name: str, text: str) -> Any:
    """A RunConfig field's value from command-line text, typed by the field's annotation."""
    types = {f.name: str(f.type) for f in fields(RunConfig)}
    if name not in types:
        raise ValueError(f"unknown config key {name!r}; accepted keys: {sorted(types)}")
    kind = types[name]
    if "None" in kind and text.strip().lower() in ("none", "null", ""):
        return None
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not valid: {name} takes a value of type {kind}") from None
    return text


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`["lr=1e-3", "steps=20"]` -> {"lr": 0.001, "steps": 20}; unknown keys and managed fields are errors."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--set {item!r} is not valid: write key=value, e.g. --set lr=1e-3")
        if key in MANAGED:
            hint = {"target_modules": "--arms", "alpha": "--alpha-rules", "out": "--out"}.get(
                key, AXIS_FLAGS.get(key)
            )
            if key == "overwrite":
                hint = "a new --out; finished runs are never overwritten"
            raise ValueError(f"--set {key}=... is not allowed: the sweep sets {key} per run (use {hint})")
        out[key] = parse_field_value(key, text)
    return out


# ------------------------------------------------------------------------------------------------ grid
@dataclass(frozen=True)
class Grid:
    """Shared config (RunConfig preset + overrides) and sub-grids whose union is the set of runs."""

    subgrids: tuple[dict[str, tuple], ...]
    """Each maps every axis in `axes` to a tuple of values (Cartesian product)."""
    config_preset: str | None = None
    """RunConfig preset the shared values start from (None: the RunConfig defaults, i.e. the embedded model)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """RunConfig overrides applied to every run (the sweep preset's, then `--set`)."""
    extra_axes: tuple[str, ...] = ()
    """Swept RunConfig fields beyond `AXES` (e.g. "beta")."""

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES + self.extra_axes

    def points(self) -> list[dict[str, Any]]:
        """Grid points (axis -> value), union of the sub-grids in order, without repeats."""
        seen: dict[str, dict[str, Any]] = {}
        for sub in self.subgrids:
            for values in itertools.product(*(sub[a] for a in self.axes)):
                point = dict(zip(self.axes, values, strict=True))
                seen.setdefault(run_id(point), point)
        return list(seen.values())

    def describe(self) -> str:
        """The grid actually run, e.g. "7 runs: rank 1, 4, 16 x credit uniform x ... + rank 4 x credit arca x ..."."""
        subs = [" x ".join(f"{a} {', '.join(map(str, sub[a]))}" for a in self.axes) for sub in self.subgrids]
        return f"{len(self.points())} runs: " + " + ".join(dict.fromkeys(subs))  # union, repeats once

    def shared_config(self) -> dict[str, Any]:
        """Every shared RunConfig value (preset and overrides resolved), without the per-point fields."""
        values = RunConfig.__dataclass_fields__
        base = make_config(self.config_preset, **self.shared)
        return {k: getattr(base, k) for k in values if k not in MANAGED and k not in self.extra_axes}

    def config(self, point: Mapping[str, Any], out: str) -> RunConfig:
        """The RunConfig of one grid point (validated by RunConfig)."""
        values = {
            **{k: v for k, v in self.shared.items() if k not in self.extra_axes},
            "rank": point["rank"],
            "credit": point["credit"],
            "seed": point["seed"],
            "target_modules": ARMS[point["arm"]],
            "alpha": alpha_of(point["alpha_rule"]),
            "out": out,
            **{a: point[a] for a in self.extra_axes},
        }
        return make_config(self.config_preset, **values)

    def to_json(self) -> dict[str, Any]:
        return {
            "config_preset": self.config_preset,
            "shared": self.shared,
            "extra_axes": list(self.extra_axes),
            "subgrids": [{a: list(v) for a, v in sub.items()} for sub in self.subgrids],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Grid:
        return cls(
            subgrids=tuple({a: tuple(v) for a, v in sub.items()} for sub in data["subgrids"]),
            config_preset=data["config_preset"],
            shared=dict(data["shared"]),
            extra_axes=tuple(data["extra_axes"]),
        )


def run_id(point: Mapping[str, Any]) -> str:
    """Directory name of one grid point, e.g. "r4-arca-s1-all-a2r" (+ "-beta0.05" per extra axis)."""
    base = f"r{point['rank']}-{point['credit']}-s{point['seed']}-{point['arm']}-a{point['alpha_rule']}"
    extra = "".join(f"-{k}{_fmt(v)}" for k, v in point.items() if k not in AXES)
    return base + extra


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def axis_values_of(cfg: RunConfig, extra_axes: Sequence[str] = ()) -> dict[str, Any]:
    """The grid point of a run's config (inverse of `Grid.config`; unmapped values pass through)."""
    arm = {v: k for k, v in ARMS.items()}.get(cfg.target_modules, cfg.target_modules)
    rule = rule_of(str(cfg.alpha))
    point = {"rank": cfg.rank, "credit": cfg.credit, "seed": cfg.seed, "arm": arm, "alpha_rule": rule}
    return point | {a: getattr(cfg, a) for a in extra_axes}


def validate_subgrid(sub: Mapping[str, Sequence], axes: Sequence[str]) -> dict[str, tuple]:
    """Check axis values before any run starts; error messages name the accepted values."""
    out: dict[str, tuple] = {}
    for axis in axes:
        values = tuple(dict.fromkeys(sub.get(axis, ())))
        if not values:
            flag = AXIS_FLAGS.get(axis, f"--vary {axis}=...")
            raise ValueError(f"empty grid: no values for {axis!r} (give at least one with {flag})")
        out[axis] = values
    bad_ranks = [r for r in out["rank"] if not isinstance(r, int) or r <= 0]
    if bad_ranks:
        raise ValueError(f"rank {bad_ranks} is not valid: use LoRA ranks >= 1, e.g. --ranks 1,4,16")
    for rule in out["alpha_rule"]:
        alpha_of(rule)
    for axis, accepted in (("credit", CREDITS), ("arm", tuple(ARMS))):
        unknown = [v for v in out[axis] if v not in accepted]
        if unknown:
            raise ValueError(f"{axis} {unknown} is not valid: choose from {list(accepted)}")
    return out


def check_matched_budgets(configs: Sequence[RunConfig], allow_unmatched: bool = False) -> tuple[int, int]:
    """(prompts, completions) every run sees; a grid whose runs differ is refused unless `allow_unmatched`."""
    budgets = {(c.steps * c.prompts_per_step, c.steps * c.batch_completions) for c in configs}
    if len(budgets) > 1 and not allow_unmatched:
        raise ValueError(
            f"unmatched rollout budgets (prompts, completions) across runs: {sorted(budgets)}; the comparison "
            "needs every run to see the same number of prompts and completions: sweep other fields than "
            "steps, prompts_per_step and num_generations, or pass --allow-unmatched-budget"
        )
    return max(budgets)


# --------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SweepPreset:
    description: str
    subgrids: tuple[dict[str, tuple], ...]
    config_preset: str | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    extra_axes: tuple[str, ...] = ()
    analysis: str = ""
    """The analysis notebook (in notebooks/) the sweep executes into SWEEP_DIR/analysis.ipynb at the end; empty:
    `arca_lab.sweep.execute.ANALYSIS_NOTEBOOK` (rank_sweep_analysis.ipynb)."""


CPU_SHARED = dict(sharpening=2.0, steps=12, prompts_per_step=16, num_generations=8, eval_prompts=64, pass_k=4)
"""Shared values of the embedded (CPU) sweeps; sized with the cost model to fit 10 minutes on 2 cores."""
OUTPUT_CREDITS = ("surprisal", "entropy_reduction", "divergence")

SWEEP_PRESETS: dict[str, SweepPreset] = {
    "default": SweepPreset(
        "embedded, <= 10 min on 2 cores: (a) rank x alpha_rule x arm at uniform credit (2 seeds for arm all); "
        "(b) credits at rank 4 (2 seeds for uniform and arca); sharpening 2",
        (
            # (a) KL vs rank: alpha 2r vs fixed, all-layer (2 seeds: the seed spread is the noise scale) ...
            dict(rank=(1, 4, 16), credit=("uniform",), seed=(0, 1), arm=("all",), alpha_rule=("2r", "fixed")),
            # ... and head-only (its KL is 1-3 orders smaller; one seed)
            dict(rank=(1, 4, 16), credit=("uniform",), seed=(0,), arm=("head",), alpha_rule=("2r", "fixed")),
            # (b) credit concentration at sharpening 2: uniform and ARCA at 2 seeds (uniform's come from (a)) ...
            dict(rank=(4,), credit=("uniform", "arca"), seed=(0, 1), arm=("all",), alpha_rule=("2r",)),
            # ... and the output-distribution credits at one seed
            dict(rank=(4,), credit=OUTPUT_CREDITS, seed=(0,), arm=("all",), alpha_rule=("2r",)),
        ),
        shared=CPU_SHARED,
    ),
    "full": SweepPreset(
        "embedded: 5 ranks x 5 credits x 2 arms x 2 alpha rules x 3 seeds (300 runs), sharpening 2",
        (
            dict(
                rank=(1, 2, 4, 16, 32),
                credit=("uniform", *OUTPUT_CREDITS, "arca"),
                seed=(0, 1, 2),
                arm=("all", "head"),
                alpha_rule=("2r", "fixed"),
            ),
        ),
        shared=CPU_SHARED,
    ),
    # arm "all" maps to "all-linear", which on Qwen3 is exactly the preset's q,k,v,o,gate,up,down list.
    "arca-paper": SweepPreset(
        "GPU: the ARCA paper's 7 runs (Qwen3-1.7B-Base, MATH): uniform and the output-distribution credits "
        "at r 64, ARCA at r 4, 16, 64",
        (
            dict(
                rank=(64,),
                credit=("uniform", *OUTPUT_CREDITS),
                seed=(1337,),
                arm=("all",),
                alpha_rule=("2r",),
            ),
            dict(rank=(4, 16, 64), credit=("arca",), seed=(1337,), arm=("all",), alpha_rule=("2r",)),
        ),
        config_preset="arca-paper",
    ),
    "merl": SweepPreset(
        "GPU: MERL's published sweep (Qwen2.5-1.5B-Instruct, GSM8K), ranks 1-64 at alpha = r, beta in {0, 0.05}",
        (
            dict(
                rank=(1, 2, 4, 8, 16, 32, 64),
                credit=("uniform",),
                seed=(0,),
                arm=("all",),
                alpha_rule=("r",),
                beta=(0.0, 0.05),
            ),
        ),
        config_preset="merl",
        extra_axes=("beta",),
    ),
    "merl-cpu": SweepPreset(
        "embedded: KL vs rank with alpha = r and beta in {0, 0.05}",
        (
            dict(
                rank=(1, 4, 16),
                credit=("uniform",),
                seed=(0,),
                arm=("all",),
                alpha_rule=("r",),
                beta=(0.0, 0.05),
            ),
        ),
        shared=CPU_SHARED,
        extra_axes=("beta",),
    ),
}


SWEEP_PRESETS["smollm-cpu"] = SweepPreset(
    "SmolLM2-135M-Instruct on chat_arith (CPU, one seed): the 5 credits at rank 8, alpha 2r, and uniform at "
    "ranks 1 and 16; runs one at a time in one warm kernel, so the base model's greedy accuracy is measured once",
    (
        dict(
            rank=(8,),
            credit=("uniform", *OUTPUT_CREDITS, "arca"),
            seed=(0,),
            arm=("all",),
            alpha_rule=("2r",),
        ),
        dict(rank=(1, 16), credit=("uniform",), seed=(0,), arm=("all",), alpha_rule=("2r",)),
    ),
    config_preset="smollm-cpu",
)

# The discrepancy preset implements the grid pre-registered in notebooks/discrepancy_analysis.ipynb (committed in
# 8e08b1d, before any run of it): change it only together with that notebook's "Pre-registered" cell, marked post hoc.
NOISE_SIGMAS = (0.003, 0.01, 0.03, 0.1, 0.3)
"""Stage A's relative weight-noise scales of the `noise` engine."""
CORRECTED_SIGMAS = (0.1, 0.3)
"""Stage B's two discrepancy levels (noise σ), fixed before the runs."""
CORRECTIONS_RUN = tuple(c for c in CORRECTIONS if c != "none")
"""Stage B: every correction but `none` (Stage A's)."""
DISCREPANCY_SHARED = dict(
    CPU_SHARED,
    top_p=1.0,
    is_clip=2.0,
    is_band="0.5,2.0",
    is_seq_agg="mean",
    rs_estimator="k3",
    rs_level="token",
)
"""Stage A and B share these: the embedded CPU budget, top-p 1 (the engine's and the trainer's log-probs are of
the same distribution), TIS C = 2, mask band [0.5, 2], geometric-mean sequence ratios, k3 rejection per token;
dc_grpo's c defaults to the bf16 copy's median δ on the first batch."""
_STAGE = dict(credit=("uniform",), arm=("all",), alpha_rule=("2r",))

SWEEP_PRESETS["discrepancy"] = SweepPreset(
    "embedded, train-inference discrepancy (pre-registered in notebooks/discrepancy_analysis.ipynb): "
    "(A) correction none x engine fp32, bf16, int8, noise sigma 0.003-0.3 x rank 1, 16 x 6 seeds; "
    "(B) 6 corrections x sigma 0.1, 0.3 x rank 16 x 3 seeds; uniform credit, all-linear, alpha 2r",
    (
        # Stage A: the numerical floor (fp32) and the deployment-like engines, no noise ...
        dict(
            rank=(1, 16),
            seed=tuple(range(6)),
            rollout_engine=("fp32", "bf16", "int8"),
            rollout_noise=(0.0,),
            correction=("none",),
            **_STAGE,
        ),
        # ... and the weight-noise ladder
        dict(
            rank=(1, 16),
            seed=tuple(range(6)),
            rollout_engine=("noise",),
            rollout_noise=NOISE_SIGMAS,
            correction=("none",),
            **_STAGE,
        ),
        # Stage B: every correction at two discrepancy levels, rank 16 (paired by seed with Stage A's none runs)
        dict(
            rank=(16,),
            seed=(0, 1, 2),
            rollout_engine=("noise",),
            rollout_noise=CORRECTED_SIGMAS,
            correction=CORRECTIONS_RUN,
            **_STAGE,
        ),
    ),
    shared=DISCREPANCY_SHARED,
    extra_axes=("rollout_engine", "rollout_noise", "correction"),
    analysis="discrepancy_analysis.ipynb",
)


def preset_names() -> list[str]:
    """Every sweep preset: `SWEEP_PRESETS` and the pre-registered studies (`arca_lab.sweep.studies`)."""
    from arca_lab.sweep.studies import LAZY_PRESETS

    return sorted({*SWEEP_PRESETS, *LAZY_PRESETS})


def get_preset(name: str) -> SweepPreset:
    """The sweep preset `name`; a pre-registered study's is built from its committed JSON (and may refuse: the
    credit study before its T is committed)."""
    from arca_lab.sweep.studies import LAZY_PRESETS

    if name in SWEEP_PRESETS:
        return SWEEP_PRESETS[name]
    if name in LAZY_PRESETS:
        return LAZY_PRESETS[name]()
    raise ValueError(f"unknown sweep preset {name!r}; choose one of {preset_names()}")


def make_grid(
    preset: str = "default",
    axes: Mapping[str, Sequence] | None = None,
    shared: Mapping[str, Any] | None = None,
) -> Grid:
    """A validated Grid: a sweep preset, with axes given on the command line replacing every sub-grid's values
    (e.g. `--ranks 2,8` sweeps ranks 2 and 8 in each sub-grid) and `--set` values overriding shared ones."""
    p = get_preset(preset)
    axes = dict(axes or {})
    extra = tuple(dict.fromkeys((*p.extra_axes, *(a for a in axes if a not in AXES))))
    known = {f.name for f in fields(RunConfig)}
    for a in extra:
        if a not in known or a in MANAGED:
            raise ValueError(
                f"cannot sweep {a!r}: extra axes must be RunConfig fields other than {list(MANAGED)}"
            )
    shared_values = {**p.shared, **dict(shared or {})}
    clash = sorted(set(shared or {}) & set(axes))
    if clash:
        raise ValueError(f"{clash} given both as a swept axis and with --set: choose one")
    subgrids = []
    for sub in p.subgrids:
        merged = {a: tuple(axes.get(a, sub.get(a, ()))) for a in AXES + extra}
        for a in extra:  # an extra axis missing from a preset sub-grid takes the shared value
            if not merged[a]:
                merged[a] = (getattr(make_config(p.config_preset, **shared_values), a),)
        subgrids.append(validate_subgrid(merged, AXES + extra))
    shared_values = {k: v for k, v in shared_values.items() if k not in extra}
    grid = Grid(tuple(subgrids), p.config_preset, shared_values, extra)
    grid.shared_config()  # validates unknown --set keys and values once more through RunConfig
    return grid
