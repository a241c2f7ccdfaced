"""Sweep presets of pre-registered studies: their grids are read from `theory/preregistered/<name>.json`, the file
committed before the runs, so the preset cannot drift from what was registered.

- `credit-pilot`: the pilot that fixes the credit study's step count T (uniform and ARCA, seeds 100-102, 48 steps,
  held-out greedy accuracy every 6 steps).
- `credit-study`: the paired credit study (6 credits x 10 seeds at 2T steps, accuracy after T/2, T and 2T, plus
  the two ARCA sensitivity arms). It refuses to run until the pilot's T is committed in the JSON.
- `credit-study-quick`: the same grid at 3 seeds and without the sensitivity arms (a smoke run, no claims).
- `prediction`: the pre-registered test of theory.kl_law.predict_kl on the head-only arm (ranks x lrs x 10 seeds at
  T = 12, checkpoints every 3 steps, no accuracy eval) plus the all-linear carry-over runs (3 seeds).
- `prediction-quick`: the same grid at 2 seeds and without the carry-over runs (a smoke run, no claims).
Analysis: `notebooks/credit_study_analysis.ipynb` (`arca_lab.analysis.credit_study`) and
`notebooks/prediction_analysis.ipynb` (`arca_lab.analysis.prediction`, `arca_lab.analysis.prediction_criteria`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from arca_lab.paths import REPO_ROOT
from arca_lab.sweep.grid import CPU_SHARED, SweepPreset

PREREGISTERED = REPO_ROOT / "theory" / "preregistered"
"""Directory of the pre-registration files (one JSON per study)."""
CREDIT_ANALYSIS = "credit_study_analysis.ipynb"


def preregistration(name: str) -> dict[str, Any]:
    """The committed pre-registration `name` (`PREREGISTERED`/<name>.json)."""
    return _read(PREREGISTERED / f"{name}.json")


@cache
def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"pre-registration {path} not found: install arca-lab from its repository (-e)"
        )
    return json.loads(path.read_text())


def _shared(reg: dict[str, Any], steps: int, eval_at: list[int]) -> dict[str, Any]:
    setup = reg["setup"]
    return dict(
        CPU_SHARED,
        sharpening=setup["sharpening"],
        prompts_per_step=setup["prompts_per_step"],
        num_generations=setup["num_generations"],
        eval_prompts=setup["eval_prompts"],
        pass_k=setup["pass_k"],
        steps=steps,
        eval_at=",".join(str(s) for s in eval_at),
    )


def _point(reg: dict[str, Any], credits, seeds, **extra) -> dict[str, tuple]:
    setup = reg["setup"]
    return dict(
        rank=(setup["rank"],),
        credit=tuple(credits),
        seed=tuple(seeds),
        arm=("all",) if setup["arm"] == "all-linear" else ("head",),
        alpha_rule=(setup["alpha_rule"],),
        **{k: tuple(v) for k, v in extra.items()},
    )


def study_steps(reg: dict[str, Any]) -> int:
    """The study's T from the committed pre-registration; refuses while the pilot's T is not committed."""
    T = reg["study"]["T"]
    if T is None:
        raise ValueError(
            "the credit study's step count T is not committed yet: run `arca-lab sweep --preset credit-pilot`, "
            "apply the pre-registered T rule (notebooks/credit_study_analysis.ipynb prints it), write T into "
            "theory/preregistered/credit_study.json and commit it before running the study"
        )
    if int(T) != T or T < 2 or T % 2:
        raise ValueError(f"credit_study.json: T={T!r} must be an even integer >= 2 (T/2 is an endpoint)")
    return int(T)


def credit_pilot() -> SweepPreset:
    reg = preregistration("credit_study")
    pilot = reg["pilot"]
    return SweepPreset(
        "embedded, credit-study pilot (pre-registered, theory/preregistered/credit_study.json): uniform and arca "
        f"x seeds {pilot['seeds']}, {pilot['steps']} steps, greedy accuracy on {reg['setup']['eval_prompts']} "
        "held-out prompts every 6 steps; fixes the study's T",
        (_point(reg, pilot["credits"], pilot["seeds"]),),
        shared=_shared(reg, pilot["steps"], pilot["eval_at"]),
        analysis=CREDIT_ANALYSIS,
    )


def credit_study(quick: bool = False) -> SweepPreset:
    reg = preregistration("credit_study")
    study = reg["study"]
    T = study_steps(reg)
    seeds = study["seeds"][:3] if quick else study["seeds"]
    subgrids = [
        _point(reg, study["credits"], seeds, sharpening=[reg["setup"]["sharpening"]], arca_layers=["last"])
    ]
    if not quick:
        for arm in study["sensitivity"]["arms"]:
            subgrids.append(
                _point(
                    reg,
                    [arm["credit"]],
                    seeds,
                    sharpening=[arm["sharpening"]],
                    arca_layers=[arm["arca_layers"]],
                )
            )
    what = (
        "3 seeds, no sensitivity arms (smoke run, no claims)"
        if quick
        else f"{len(seeds)} seeds + 2 ARCA arms"
    )
    return SweepPreset(
        f"embedded, paired credit study (pre-registered, theory/preregistered/credit_study.json): "
        f"{len(study['credits'])} credits x {what}, 2T = {2 * T} steps, accuracy after T/2, T, 2T",
        tuple(subgrids),
        shared=_shared(reg, 2 * T, [T // 2, T]),
        extra_axes=("sharpening", "arca_layers"),
        analysis=CREDIT_ANALYSIS,
    )


PREDICTION_ANALYSIS = "prediction_analysis.ipynb"


def prediction(quick: bool = False) -> SweepPreset:
    """The KL-law test's grid, read from theory/preregistered/kl_law_prediction.json."""
    reg = preregistration("kl_law_prediction")
    setup = reg["setup"]
    shared = {k: setup[k] for k in ("task", "steps", "save_every", "prompts_per_step", "num_generations")}
    shared |= {k: setup[k] for k in ("temperature", "grad_clip", "eval_prompts", "pass_k", "optimizer")}
    shared |= {"scaling": setup["scaling"], "lr_schedule": setup["lr_schedule"]}
    seeds = setup["seeds"][:2] if quick else setup["seeds"]

    def sub(arm: str, ranks, lrs, seeds) -> dict[str, tuple]:
        return dict(
            rank=tuple(ranks),
            credit=(setup["credit"],),
            seed=tuple(seeds),
            arm=(arm,),
            alpha_rule=(setup["alpha_rule"],),
            lr=tuple(lrs),
        )

    subgrids = [sub("head", setup["ranks"], setup["lrs"], seeds)]
    carry = reg["secondary"]["carry_over"]
    if not quick:
        subgrids.append(sub(carry["arm"], carry["ranks"], carry["lrs"], carry["seeds"]))
    what = (
        "2 seeds, no carry-over runs (smoke run, no claims)"
        if quick
        else (f"{len(seeds)} seeds + all-linear carry-over ({len(carry['seeds'])} seeds)")
    )
    return SweepPreset(
        "embedded, KL-law prediction test (pre-registered, theory/preregistered/kl_law_prediction.json): head-only "
        f"ranks {setup['ranks']} x lr {setup['lrs']} x {what}; T = {setup['steps']}, checkpoints every "
        f"{setup['save_every']} steps, no accuracy eval",
        tuple(subgrids),
        shared=shared,
        extra_axes=("lr",),
        analysis=PREDICTION_ANALYSIS,
    )


LAZY_PRESETS = {
    "credit-pilot": credit_pilot,
    "credit-study": credit_study,
    "credit-study-quick": lambda: credit_study(quick=True),
    "prediction": prediction,
    "prediction-quick": lambda: prediction(quick=True),
}
"""Presets built when asked for (`grid.get_preset`): they read the pre-registration file, and the study needs its
committed T."""
