"""The credit study's statistics (`arca_lab.analysis.credit_study`) with the hand computations written out, and
its presets read from the committed pre-registration."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from arca_lab.analysis import credit_study as cs
from arca_lab.sweep import studies
from arca_lab.sweep.grid import get_preset, make_grid


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 with m = 4: 4 x 0.01 = 0.04, max(0.04, 3 x 0.02) = 0.06,
    # max(0.06, 2 x 0.04) = 0.08, max(0.08, 1 x 0.30) = 0.30; returned in input order; NaN stays out
    assert cs.holm([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    out = cs.holm([0.5, math.nan])
    assert out[0] == 0.5 and math.isnan(out[1])


def test_mde_by_hand():
    # n = 10, s_d = 0.05: t_{9, 0.975} = 2.2622, t_{9, 0.8} = 0.8834 -> (3.1456) x 0.05 / sqrt(10) = 0.04974
    assert cs.mde(0.05, 10) == pytest.approx(3.14557 * 0.05 / math.sqrt(10), rel=1e-4)
    assert math.isnan(cs.mde(0.05, 1)) and math.isnan(cs.mde(math.nan, 5))


def _acc(rows):
    return pd.DataFrame(
        [dict(credit=c, sharpening=p, arca_layers=l, seed=s, step=t, accuracy=a) for c, p, l, s, t, a in rows]
    )


def test_pilot_T_follows_the_pre_registered_rule():
    # uniform seed-mean accuracy: step 0 0.20, 6 0.25, 12 0.30, 18 0.33, 24 0.35, 48 0.34; largest gain 0.15,
    # 80 % of it = 0.12 first reached at step 18 (gain 0.13) -> T = 18
    curve = {0: 0.20, 6: 0.25, 12: 0.30, 18: 0.33, 24: 0.35, 48: 0.34}
    rows = [
        ("uniform", 2.0, "last", s, t, a + (0.01 if s == 1 else -0.01))
        for s in (1, 2)
        for t, a in curve.items()
    ]
    assert cs.pilot_T(_acc(rows))["T"] == 18
    # the gain reached only at 36: capped at 24; a flat curve (gain 0.01 < 0.02): 24
    late = {0: 0.2, 6: 0.2, 12: 0.21, 24: 0.22, 36: 0.40}
    assert cs.pilot_T(_acc([("uniform", 2.0, "last", 1, t, a) for t, a in late.items()]))["T"] == 24
    flat = {0: 0.2, 6: 0.21, 12: 0.2}
    assert cs.pilot_T(_acc([("uniform", 2.0, "last", 1, t, a) for t, a in flat.items()]))["T"] == 24


def test_contrasts_are_paired_by_seed_with_a_student_t_interval():
    # uniform 0.50, 0.40, 0.60 on seeds 0-2; arca 0.55, 0.43, 0.68 -> d = 0.05, 0.03, 0.08: mean 0.05333,
    # s_d = 0.025166, t_{2, 0.975} = 4.3027 -> half-width 4.3027 x 0.025166 / sqrt(3) = 0.062516
    uni = [("uniform", 2.0, "last", s, 12, a) for s, a in enumerate((0.50, 0.40, 0.60))]
    arca = [("arca", 2.0, "last", s, 12, a) for s, a in enumerate((0.55, 0.43, 0.68))]
    # surprisal 0.10 lower than uniform on every seed: s_d = 0, p NaN (no test), a sensitivity arm p = 1
    surp = [("surprisal", 2.0, "last", s, 12, a - 0.10) for s, a in enumerate((0.50, 0.40, 0.60))]
    sens = [("arca", 1.0, "last", s, 12, a) for s, a in enumerate((0.50, 0.42, 0.61))]
    out = cs.contrasts(_acc(uni + arca + surp + sens), step=12).set_index(["credit", "sharpening"])
    a = out.loc[("arca", 2.0)]
    assert a.role == "primary" and a.n == 3 and a.mean_diff == pytest.approx(0.053333, abs=1e-6)
    assert (a.lo, a.hi) == pytest.approx((0.053333 - 0.062516, 0.053333 + 0.062516), abs=1e-5)
    assert cs.verdict(a) == "no difference shown"  # the interval contains 0 with 3 seeds
    assert out.loc[("surprisal", 2.0)].role == "family" and out.loc[("arca", 1.0)].role == "sensitivity"
    assert cs.verdict(out.loc[("arca", 1.0)]) == "description"


def test_presets_come_from_the_committed_pre_registration(tmp_path, monkeypatch):
    reg = json.loads((studies.PREREGISTERED / "credit_study.json").read_text())
    pilot = make_grid("credit-pilot")
    assert sorted({p["seed"] for p in pilot.points()}) == reg["pilot"]["seeds"]
    assert pilot.shared["steps"] == reg["pilot"]["steps"] and pilot.shared["eval_prompts"] >= 512
    if reg["study"]["T"] is None:  # before the pilot's T is committed, the study refuses and says what to do
        with pytest.raises(ValueError, match="credit-pilot"):
            get_preset("credit-study")
    # a registration with T = 12: 2T = 24 steps, accuracy after 6 and 12, 6 credits x 10 seeds + 2 arms x 10 seeds
    reg["study"]["T"] = 12
    (tmp_path / "credit_study.json").write_text(json.dumps(reg))
    monkeypatch.setattr(studies, "PREREGISTERED", tmp_path)
    grid = make_grid("credit-study")
    assert grid.shared["steps"] == 24 and grid.shared["eval_at"] == "6,12"
    assert len(grid.points()) == 6 * 10 + 2 * 10
    assert len(make_grid("credit-study-quick").points()) == 6 * 3
