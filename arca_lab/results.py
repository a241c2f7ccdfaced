"""A run as an xarray Dataset (`run.nc`, h5netcdf): curves over `step`, the final batch over (`sample`, `token`).

Layout (every dimension named; config values as scalar coordinates; provenance in attrs):
- dim `step`: reward, loss, learning_rate, grad_norm (pre-clip), credit_* (gini, etr, effn, tokens, role masses),
  residual_*, kl_* (probe), head_input_max_norm, step_time, ... one variable per logged metric ("/" -> "_").
- dims (`sample`, `token`): the last micro-batch's completion_ids (-1 padded), completion_mask, weights, scores,
  token_roles, token_advantages, kl_policy_ref, kl_ref_policy, policy_logps, ref_logps (NaN padded).
- dim `layer`: adapted modules with a0_fro / a0_op (||A0|| at initialisation), d_in, d_out.
- dim `eval_prompt`: greedy_correct_{before,after}, pass_correct_{before,after} (1/0 per held-out prompt; greedy
  decoding, dropout off, the model dtype).
- dim `eval_step` (only with RunConfig.eval_at): greedy_correct_at (eval_step, eval_prompt) and greedy_accuracy_at,
  the same prompts scored after those optimiser steps (the final step's is greedy_accuracy_after).
- attrs: config_json, git_sha, versions_json, base_model_json (`base_model_info`: path or hub id, embedded build
  hash and id), title.
- what a KL bound needs: w_lm_op_norm (||W_lm||_op of the base head), max_head_input_norm (max ||x|| seen by lm_head),
  adapter_scale s, temperature, learning_rate and grad_norm per step (see theory/schema.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from arca_lab.config import RunConfig

_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "xarray", "arca-lab")


def git_sha() -> str:
    """Commit of the arca-lab checkout (with "-dirty" if modified), or "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = str(metadata.version(name))
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def base_model_info(name_or_path: str) -> dict[str, Any]:
    """Which base model a run adapted: its path or hub id and, for an embedded build, the build's hash, id and
    accuracy (from its build_info.json), so runs on different builds are never mistaken for the same base; for a
    converted packaged model (`arca_lab.pretrained`), its provenance.json (package version, GGUF SHA-256, Q4_1
    dequantised)."""
    from arca_lab.embedded import BUILD_INFO
    from arca_lab.pretrained import PROVENANCE

    info: dict[str, Any] = {"name_or_path": name_or_path}
    build = Path(name_or_path) / BUILD_INFO
    if build.is_file():
        meta = json.loads(build.read_text())
        keep = ("name", "seed", "build_hash", "build_id", "created", "final_accuracy", "num_parameters")
        info["embedded_build"] = {k: meta.get(k) for k in keep}
    converted = Path(name_or_path) / PROVENANCE
    # a packaged pretrained model (arca_lab.pretrained): package, GGUF hash, quantisation
    if converted.is_file():
        info["converted_from"] = json.loads(converted.read_text())
    return info


LONG_NAMES = {
    "reward": "mean reward of the step's completions",
    "credit_gini": "credit Gini (mean over the step's completions)",
    "credit_etr": "effective-token ratio EffN/T (mean over the step's completions)",
    "credit_effn": "effective tokens EffN (mean over the step's completions)",
    "credit_fallback_fraction": "share of completions whose credit fell back to uniform",
    "kl_policy_ref_mean": "KL(pi_theta||pi_base) per token, mean over the probe rows",
    "kl_ref_policy_mean": "KL(pi_base||pi_theta) per token, mean over the probe rows",
    "kl_policy_ref_max": "KL(pi_theta||pi_base) per token, max over the probe rows",
    "kl_ref_policy_max": "KL(pi_base||pi_theta) per token, max over the probe rows",
    "residual_mean": "||h_adapted - h_base|| at the lm_head input, mean over the probe rows",
    "residual_max": "||h_adapted - h_base|| at the lm_head input, max over the probe rows",
}
"""`long_name` attrs of the main per-step variables (plot labels); the README's "What each number means" has the
full definitions."""


def config_coords(cfg: RunConfig) -> dict[str, Any]:
    """Config values as scalar coordinates (None -> NaN for numbers, "" for strings; bools as int)."""
    coords: dict[str, Any] = {}
    for key, value in json.loads(cfg.to_json()).items():
        if key in ("out", "overwrite"):
            continue
        if value is None:
            value = np.nan if key == "grad_clip" else ""
        coords[key] = int(value) if isinstance(value, bool) else value
    coords["lora_alpha"] = cfg.lora_alpha()
    coords["adapter_scale"] = cfg.adapter_scale()
    return coords


def _pad(rows: np.ndarray, mask: np.ndarray, fill: float) -> np.ndarray:
    return np.where(mask.astype(bool), rows, fill)


def build_dataset(
    cfg: RunConfig,
    step_logs: list[dict[str, float]],
    last_batch: dict[str, Any] | None,
    layers: dict[str, dict[str, float]],
    evals: dict[str, Any],
    scalars: dict[str, float],
    base_model: dict[str, Any] | None = None,
    evals_at: dict[int, np.ndarray] | None = None,
) -> xr.Dataset:
    """Assemble run.nc; see the module docstring for the layout."""
    ds = xr.Dataset(coords={"step": np.arange(1, len(step_logs) + 1)})
    keys = sorted({k for log in step_logs for k in log if k != "step"})
    for key in keys:
        name = key.replace("/", "_")
        ds[name] = ("step", np.array([log.get(key, np.nan) for log in step_logs], dtype=float))
        if name in LONG_NAMES:
            ds[name].attrs["long_name"] = LONG_NAMES[name]
    if last_batch is not None:
        mask = last_batch["completion_mask"].numpy().astype(bool)
        ds["completion_mask"] = (("sample", "token"), mask.astype(np.int8))
        ds["completion_ids"] = (
            ("sample", "token"),
            _pad(last_batch["completion_ids"].numpy(), mask, -1).astype(int),
        )
        for key, value in last_batch.items():
            if key in ("completion_ids", "completion_mask"):
                continue
            arr = value.numpy()
            if arr.ndim == 1:
                ds[key] = ("sample", arr.astype(float))
            elif key == "token_roles":
                ds[key] = (("sample", "token"), _pad(arr, mask, -1).astype(np.int8))
            else:
                ds[key] = (("sample", "token"), _pad(arr, mask, np.nan).astype(float))
    if layers:
        names = list(layers)
        ds = ds.assign_coords(layer=names)
        for field in next(iter(layers.values())):
            ds[field] = ("layer", np.array([layers[n][field] for n in names], dtype=float))
    for key, value in evals.items():
        if np.ndim(value) == 1:
            ds[key] = ("eval_prompt", np.asarray(value, dtype=float))
        else:
            ds[key] = float(value)
    for key, value in scalars.items():
        ds[key] = float(value)
    if evals_at:  # RunConfig.eval_at: greedy correctness after those optimiser steps
        steps = sorted(evals_at)
        correct = np.stack([np.asarray(evals_at[s], dtype=float) for s in steps])  # (eval_step, eval_prompt)
        ds = ds.assign_coords(eval_step=steps)
        ds["greedy_correct_at"] = (("eval_step", "eval_prompt"), correct)
        ds["greedy_accuracy_at"] = ("eval_step", correct.mean(axis=1))
    ds = ds.assign_coords(config_coords(cfg))
    ds.attrs.update(
        config_json=cfg.to_json(),
        git_sha=git_sha(),
        versions_json=json.dumps(versions()),
        base_model_json=json.dumps(base_model or {}),
        title=f"arca-lab run: credit={cfg.credit} rank={cfg.rank} seed={cfg.seed}",
    )
    return ds


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write via a temp file and os.replace: a killed write leaves the old file (or none), never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_netcdf(ds: xr.Dataset, path: str | Path) -> Path:
    """Write atomically: a temp file in the same directory, then os.replace (a killed write leaves no .nc)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_WRITTEN: dict[str, tuple[tuple[int, int, int], xr.Dataset]] = {}
"""The run.nc this process wrote last, by resolved path: (inode, size, mtime_ns) when written, the dataset."""


def remember_written(ds: xr.Dataset, path: str | Path) -> None:
    """Keep `ds`, just written to `path`, for `load_run` (one entry: the run notebook reads its own run back)."""
    path = Path(path).resolve()
    _WRITTEN.clear()
    _WRITTEN[str(path)] = (_signature(path), ds)


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_run(path: str | Path) -> xr.Dataset:
    """Open a run directory's run.nc (or a .nc path) fully into memory.

    The run this process has just written (`remember_written`, called by `arca_lab.run.train`) comes back as a
    deep copy of the dataset written, while the file is unchanged (same inode, size and mtime): a warm sweep
    kernel saves h5netcdf's 0.3 s per read. It is identical to the file's contents (`xr.testing.assert_identical`,
    tests/test_run.py); any change to the file reads the file again.
    """
    path = Path(path)
    path = (path / "run.nc" if path.is_dir() else path).resolve()
    hit = _WRITTEN.get(str(path))
    if hit is not None and path.exists() and _signature(path) == hit[0]:
        return hit[1].copy(deep=True)
    return xr.load_dataset(path, engine="h5netcdf")


def load_run_variables(path: str | Path, names: Sequence[str]) -> xr.Dataset:
    """Only `names` of a run.nc (data variables and config coordinates), with the dimension coordinates they use.

    Decoded by xarray (`xr.decode_cf`) from the h5netcdf store `load_run` reads, so values, dtypes and attrs are
    `load_run`'s (tests/test_run.py), but only these variables are opened: ~0.06 s against ~0.4 s for the ~140
    variables of a whole run (h5netcdf looks each one up ~20 times). What differs from `load_run(path)[names]`:
    coordinates not in `names` are left out, and a config value in `names` is a coordinate only when a requested
    data variable lists it (every run.nc data variable lists them all); alone, it comes back as a data variable.
    Names the file lacks are left out, as `name in ds` would say. For callers that read a few numbers of many runs
    (verify-bound in a sweep's analysis).
    """
    from xarray.backends.h5netcdf_ import H5NetCDFStore

    path = Path(path)
    store = H5NetCDFStore.open(path / "run.nc" if path.is_dir() else path, "r")
    try:
        have = store.ds.variables
        wanted = [n for n in dict.fromkeys(names) if n in have]
        dims = dict.fromkeys(d for n in wanted for d in have[n].dimensions)
        wanted += [d for d in dims if d in have and d not in wanted]
        raw = xr.Dataset(
            {n: store.open_store_variable(n, have[n]) for n in wanted}, attrs=dict(store.get_attrs())
        )
        return xr.decode_cf(raw).load()
    finally:
        store.close()
