"""The sweep cube: `combine_runs` builds `sweep.nc` from run directories; `summary_table` reads it back.

Layout of the cube: see the `arca_lab.sweep` module docstring (dims, coords, variables, attrs).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from arca_lab.config import RunConfig
from arca_lab.credit import CREDITS
from arca_lab.results import load_run
from arca_lab.sweep.grid import ALPHA_RULES, ARMS, AXES, axis_values_of, run_id

SUMMARY_LAST_STEPS = 3
"""Summary metrics are the mean over a run's last this-many steps (single steps are noisy at 16 prompts)."""
SUMMARY_METRICS = {
    "reward": "reward",
    "kl_base_pi": "kl_ref_policy_mean",
    "kl_pi_base": "kl_policy_ref_mean",
    "gini": "credit_gini",
    "etr": "credit_etr",
}
"""Summary column -> run.nc variable (kl_base_pi is KL(pi_base||pi_theta), MERL's direction)."""


# ------------------------------------------------------------------------------------------------ combine
def _axis_order(axis: str, values: Iterable[Any]) -> list[Any]:
    """Axis coordinate order: credits, arms and alpha rules in their canonical order, numbers ascending."""
    canonical = {"credit": CREDITS, "arm": tuple(ARMS), "alpha_rule": tuple(ALPHA_RULES)}.get(axis, ())
    unique = list(dict.fromkeys(values))
    return sorted(unique, key=lambda v: (canonical.index(v) if v in canonical else len(canonical), v))


def _same(values: Sequence[Any]) -> bool:
    first = values[0]
    return all(v == first or (isinstance(v, float) and math.isnan(v) and math.isnan(first)) for v in values)


def _load(path: str | Path) -> tuple[xr.Dataset | None, str]:
    """(dataset, "") or (None, "Type: message") for an unreadable file (h5py and netCDF raise many types)."""
    try:
        return load_run(path), ""
    except Exception as err:
        return None, f"{type(err).__name__}: {err}".splitlines()[0]


PARALLEL_LOAD_MIN = 16
"""Fewer run.nc files than this load in the calling process (starting processes costs ~2 s)."""


def load_runs(paths: Sequence[str | Path], processes: int = 1) -> tuple[list[xr.Dataset | None], list[str]]:
    """Load many run.nc files (run directories or paths), on `processes` processes when there are many:
    (datasets, errors) in the order of `paths`, None and "Type: message" for an unreadable file.

    Reading a run.nc costs ~0.36 s of CPU (h5netcdf opens each of its ~130 variables), so the 300 runs of the
    full sweep take ~110 s on one core.
    """
    if processes <= 1 or len(paths) < PARALLEL_LOAD_MIN:
        pairs = [_load(p) for p in paths]
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:  # torch is imported
            pairs = list(pool.map(_load, paths, chunksize=max(1, len(paths) // (4 * processes))))
    return [ds for ds, _ in pairs], [err for _, err in pairs]


def combine_runs(
    run_dirs: Iterable[str | Path | xr.Dataset],
    extra_axes: Sequence[str] = (),
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """The `sweep.nc` cube (see the module docstring) of finished run directories (or run.nc paths, or their
    datasets already loaded).

    Built with numpy indexing rather than `xr.merge`, whose outer join would materialise every run at the
    size of the whole cube. `attrs` are added to the cube's attrs (the runner adds `sweep_json`).
    """
    axes = AXES + tuple(extra_axes)
    runs: list[tuple[dict[str, Any], xr.Dataset]] = []
    for d in run_dirs:
        ds = d if isinstance(d, xr.Dataset) else load_run(d)
        point = axis_values_of(RunConfig.from_json(ds.attrs["config_json"]), extra_axes)
        runs.append((point, ds))
    if not runs:
        raise ValueError("no finished runs to combine")
    ids = [run_id(p) for p, _ in runs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"several runs share the grid points {dupes}: combine runs of one sweep")

    coords: dict[str, Any] = {a: _axis_order(a, [p[a] for p, _ in runs]) for a in axes}
    shape = tuple(len(coords[a]) for a in axes)
    where = [tuple(coords[a].index(p[a]) for a in axes) for p, _ in runs]
    inner = {  # per-run dims: union of step values and layer names; ranges for the rest
        "step": sorted({int(s) for _, ds in runs for s in ds.variables["step"].values}),
        "eval_step": sorted(
            {int(s) for _, ds in runs if "eval_step" in ds.coords for s in ds.variables["eval_step"].values}
        ),
        "layer": list(
            dict.fromkeys(
                str(n) for _, ds in runs if "layer" in ds.coords for n in ds.variables["layer"].values
            )
        ),
    }
    inner = {k: v for k, v in inner.items() if v}
    for dim in ("sample", "token", "eval_prompt"):
        sizes = [ds.sizes[dim] for _, ds in runs if dim in ds.sizes]
        if sizes:  # kept when empty: runs with eval_prompts = 0 have a zero-length eval_prompt dimension
            inner[dim] = list(range(max(sizes)))
    coords.update(inner)

    def positions(ds: xr.Dataset, dim: str) -> np.ndarray:
        if dim in ("step", "eval_step", "layer"):
            lookup = {v: i for i, v in enumerate(inner[dim])}
            conv = str if dim == "layer" else int
            return np.array([lookup[conv(v)] for v in ds.variables[dim].values], dtype=int)
        return np.arange(ds.sizes[dim])

    # `ds.variables[name]` (a Variable) rather than `ds[name]`: a DataArray carries the ~60 scalar config
    # coordinates, and building 25 000 of them was most of the combine's own time.
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for name in dict.fromkeys(v for _, ds in runs for v in ds.data_vars):
        dims = next(ds.variables[name].dims for _, ds in runs if name in ds)
        arr = np.full(shape + tuple(len(coords[d]) for d in dims), np.nan)
        for (_, ds), pos in zip(runs, where, strict=True):
            if name not in ds:
                continue
            values = ds.variables[name].values
            if dims:
                arr[pos][np.ix_(*(positions(ds, d) for d in dims))] = values
            else:
                arr[pos] = values
        data_vars[name] = (axes + dims, arr)

    cube = xr.Dataset(data_vars, coords=coords)
    for (
        var
    ) in cube.data_vars.values():  # mostly NaN in a sparse union of sub-grids: gzip makes it ~30x smaller
        var.encoding = {"zlib": True, "complevel": 4}
    run_ids = np.full(shape, "", dtype=object)
    for rid, pos in zip(ids, where, strict=True):
        run_ids[pos] = rid
    cube = cube.assign_coords(
        run_id=(axes, run_ids.astype(str)), has_run=(axes, (run_ids != "").astype(np.int8))
    )
    config_names = dict.fromkeys(
        k for _, ds in runs for k in ds.coords if ds.variables[k].ndim == 0 and k not in axes
    )
    for key in config_names:
        values = [ds.variables[key].values.item() if key in ds.coords else None for _, ds in runs]
        if None not in values and _same(values):
            cube = cube.assign_coords({key: values[0]})
            continue
        is_str = any(isinstance(v, str) for v in values)
        arr = np.full(shape, "" if is_str else np.nan, dtype=object if is_str else float)
        for v, pos in zip(values, where, strict=True):
            if v is not None:
                arr[pos] = v
        cube = cube.assign_coords({key: (axes, arr.astype(str) if is_str else arr)})

    shas = sorted({ds.attrs.get("git_sha", "unknown") for _, ds in runs})
    cube.attrs.update(
        title=f"arca-lab sweep: {len(runs)} runs over {', '.join(a for a in axes if len(coords[a]) > 1)}",
        run_configs_json=json.dumps(
            {i: ds.attrs["config_json"] for i, (_, ds) in zip(ids, runs, strict=True)}
        ),
        git_sha=",".join(shas),
        versions_json=runs[0][1].attrs.get("versions_json", "{}"),
        # distinct base models of the runs (one, unless the grid varies the model or the embedded build changed)
        base_models_json=json.dumps(
            [json.loads(b) for b in sorted({ds.attrs.get("base_model_json", "{}") for _, ds in runs})]
        ),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(attrs or {}),
    )
    return cube


def load_sweep(sweep_dir: str | Path) -> xr.Dataset:
    """Open `SWEEP_DIR/sweep.nc` (or a .nc path) fully into memory."""
    path = Path(sweep_dir)
    return xr.load_dataset(path / "sweep.nc" if path.is_dir() else path, engine="h5netcdf")


# ------------------------------------------------------------------------------------------------ summary
def run_summary(ds: xr.Dataset) -> dict[str, float]:
    """Summary metrics of one run (a run.nc or one grid point of sweep.nc): last-steps means and accuracies."""
    steps = ds["step"].values
    valid = (
        [s for s in steps if not np.isnan(ds["reward"].sel(step=s).values).all()] if "reward" in ds else []
    )
    last = ds.sel(step=valid[-SUMMARY_LAST_STEPS:]) if valid else ds
    row = {}
    for col, var in SUMMARY_METRICS.items():
        row[col] = float(last[var].mean()) if var in ds else math.nan
    for when in ("before", "after"):
        var = f"greedy_accuracy_{when}"
        row[f"acc_{when}"] = float(ds[var]) if var in ds else math.nan
    return row


def summary_table(ds: xr.Dataset) -> list[dict[str, Any]]:
    """One row per grid point that has a run: axis values, then `run_summary` of that run."""
    axes = [d for d in ds["run_id"].dims]
    rows = []
    for idx in zip(*np.nonzero(ds["has_run"].values), strict=True):
        point = ds.isel(dict(zip(axes, idx, strict=True)))
        row: dict[str, Any] = {a: point[a].item() for a in axes}
        rows.append(row | run_summary(point))
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(no finished runs)"
    cols = list(rows[0])
    text = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)) for t in text]
    return "\n".join(lines)
