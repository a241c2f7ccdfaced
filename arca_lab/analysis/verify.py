"""`arca-lab verify-bound RUN_OR_SWEEP_DIR`: the theory's KL bounds against a trained adapter's measured KL.

For one run: load the base model and the trained adapter, sample completions of the task's held-out prompts
(`arca_lab.run.load_task(cfg).eval_rows(n, seed=EVAL_SEED)`) from the adapted model, and measure at every valid
completion position t the exact KL over the vocabulary in both directions, at temperature 1 and at the run's
sampling temperature τ (`arca_lab.analysis.heldout_kl.measure_tokens`). Then evaluate every check that applies:

    every run  lemma  ‖x_t‖₂ ≤ R = √d·max|g|, x_t = input of lm_head, g = final RMSNorm gain  aposteriori P2
               lemma  KL_t ≤ K(range(z_t)/τ), z_t = exact logit shift at t (either direction)  softmax_kl L3
    head-only  bound  KL_t ≤ K(R·D(ΔW)/τ) for every input in the ball, ΔW = s·B·A             aposteriori P3
               bound  KL_t ≤ K(ρ), ρ from the run's hyper-parameters (BoundInputs)            apriori A6/A7
               input  recorded learning rates = the schedule the a-priori bound assumes       apriori A2
    lm_head    lemma  α_div,t ≤ range(W_lm Δh_t)/τ = range(z_t)/τ                              softmax_kl L6
    unadapted  bound  α_div,t ≤ √2‖W_lm‖₂‖Δh_t‖/τ, Δh_t = change of x_t (credit link)         aposteriori P4
               (no a-priori bound: the single-layer theory does not cover a multi-layer adapter)

The kind (KINDS) says what a row can show. A "bound" row is a verification: its bound comes from something
other than the measured tokens' own logit shift (the ball from ΔW and R, the a-priori bound from
hyper-parameters, the credit link from ‖W_lm‖ and ‖Δh_t‖). A "lemma" row applies an inequality to the very
arrays the measured value is computed from: K(range(z_t)/τ) and range(z_t)/τ use the exact shift z_t of the
same token, and ‖x_t‖ ≤ R is a property of the final RMSNorm whatever the weights. A lemma row cannot fail
unless the measurement or the theory code has a bug, so it is reported apart and never counted as a bound
verified against an adapter. An "input" row checks an input of the a-priori bound.

A row "holds" when measured ≤ bound·(1 + rtol) + 1e-12 (a NaN measured value or bound never holds), rtol =
1e-5 in float32 (2⁻⁷ in bf16: P2's caveat on rounding in the model dtype); all KLs and bounds are computed in
float64 from the captured lm_head inputs. `--scale-inputs c` multiplies each check's magnitude input by c (R
for P2/P3/A6–A7, ΔW and Δh for the per-token checks): with c = 0.5 the lemma rows fail on a trained adapter
(they are exact on their own arrays, so this shows they are evaluated on the real ones); the bound rows fail
only where they are tight. Exit code: 0 when every row holds, 1 when any is violated (a lemma row at c = 1: a
bug), 2 on bad input.

Notation (theory/aposteriori.md):
    N: valid completion tokens over all held-out samples; d: lm_head input size; V: vocabulary rows of lm_head
    x_t, x_t^base: (N, d) input of lm_head in the adapted / base forward (equal for head-only LoRA)
    z_t = logits_θ,t − logits_ref,t: (N, V) logit shift, ΔW x_t (head-only) or W_lm Δh_t (lm_head unadapted)
    α_div,t = |log π_θ(y_t) − log π_ref(y_t)| at temperature τ (ARCA paper, arXiv 2606.00257, §scores)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from peft import PeftModel

from arca_lab.analysis.heldout_kl import TokenMeasurement, measure_tokens
from arca_lab.config import HF_LR_SCHEDULERS, RunConfig
from arca_lab.exit_codes import EX_USAGE, UsageParser
from arca_lab.models import base_head, lm_head_module_name, lm_head_of, load_policy
from arca_lab.results import load_run_variables
from theory.aposteriori import aposteriori_kl_bound, rmsnorm_radius
from theory.apriori import apriori_kl_bound, lr_multipliers
from theory.schema import BoundInputs
from theory.softmax_kl import kl_sharp_bound

ATOL = 1e-12
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
KL_DIRECTIONS = {"kl_policy_ref": "KL(pi_theta||pi_ref)", "kl_ref_policy": "KL(pi_ref||pi_theta)"}
KINDS = {
    "bound": "bound checks (ball, a-priori, credit link)",
    "lemma": "lemma checks (K(range(z_t)/tau), alpha_div <= range(z_t)/tau, ||x_t|| <= R)",
    "input": "input checks (lr schedule)",
}
"""Row kind -> what the summary line calls its rows (module docstring: only "bound" rows verify the
theory)."""


# ---------------------------------------------------------------------------------------------- runs on disk
def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "run.nc").is_file()


def find_runs(path: str | Path) -> list[Path]:
    """[path] for a run directory (config.json + run.nc), else every run directory below it (sorted), leaving out
    hidden directories and, in a sweep directory, the runs kept under failed/ (their notebook did not finish)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory: pass a run directory or a sweep directory holding runs")
    if is_run_dir(path):
        return [path]
    sweep = (path / "sweep.json").is_file()

    def skipped(parts: tuple[str, ...]) -> bool:
        return any(part.startswith(".") for part in parts) or (sweep and parts[0] == "failed")

    runs = sorted(
        p.parent
        for p in path.rglob("run.nc")
        if is_run_dir(p.parent) and not skipped(p.relative_to(path).parts)
    )
    if not runs:
        raise ValueError(
            f"{path} is neither a run directory (config.json + run.nc, written by `arca-lab train`) nor a sweep "
            "directory holding run directories"
        )
    return runs


# ---------------------------------------------------------------------------------------------- bound rows
@dataclass
class BoundRow:
    """One line of the table: a bound, its kind (KINDS), direction and temperature, the measured value and the
    bound."""

    run: str
    kind: str
    bound: str
    direction: str
    tau: float | None
    measured: float
    bound_value: float
    holds: bool | None  # None: not applicable (see note)
    note: str = ""

    @property
    def failed(self) -> bool:
        """A checked row (holds not None) that does not hold or shows a NaN: a NaN never counts as holding."""
        if self.holds is None:
            return False
        return not (self.holds and not math.isnan(self.measured) and not math.isnan(self.bound_value))

    @property
    def ratio(self) -> float:
        """Tightness measured/bound (0 when both are 0)."""
        if self.holds is None:
            return math.nan
        if self.bound_value == 0:
            return 0.0 if self.measured <= ATOL else math.inf
        return self.measured / self.bound_value


RUN_INPUTS = (
    *("learning_rate", "layer", "a0_op", "vocab_size", "d_model", "w_lm_op_norm"),
    *(
        "lr",
        "lr_schedule",
        "steps",
        "warmup_steps",
        "rank",
        "lora_alpha",
        "scaling",
        "optimizer",
        "grad_clip",
    ),
    *("adam_beta1", "adam_beta2", "adam_eps", "weight_decay"),
)
"""What `bound_rows` reads of a run.nc (variables and config coordinates); `verify_run` loads only these."""


def schedule_error(ds: xr.Dataset) -> tuple[float, float, int]:
    """(max |recorded − lr·λ(t)|, its tolerance 1e-6·lr, steps compared): whether the recorded per-step learning
    rates are those of the theory's schedule (apriori.md A2); NaN when no step was recorded.

    transformers logs the learning rate an optimiser step used (read before the scheduler steps)."""
    c = ds.coords
    expected = float(c["lr"]) * lr_multipliers(
        HF_LR_SCHEDULERS[str(c["lr_schedule"].item())], int(c["steps"]), int(c["warmup_steps"])
    )
    recorded = ds["learning_rate"].values if "learning_rate" in ds else np.zeros(0)
    n = min(len(recorded), len(expected))
    err = float(np.max(np.abs(recorded[:n] - expected[:n]))) if n else math.nan
    return err, 1e-6 * float(c["lr"]), n


def apriori_inputs(ds: xr.Dataset, head_layer: str, input_radius: float, temperature: float) -> BoundInputs:
    """BoundInputs from a head-only run's recorded hyper-parameters (run.nc scalar coords) and ‖A₀‖₂ of lm_head."""
    c = ds.coords
    if head_layer not in ds["layer"].values:
        raise ValueError(f"run.nc records no adapter layer {head_layer!r}: layers {list(ds['layer'].values)}")
    clip = float(c["grad_clip"])
    return BoundInputs(
        vocab_size=int(ds["vocab_size"]),
        in_features=int(ds["d_model"]),
        rank=int(c["rank"]),
        alpha=float(c["lora_alpha"]),
        lr=float(c["lr"]),
        steps=int(c["steps"]),
        input_radius=float(input_radius),
        scaling=str(c["scaling"].item()),
        optimizer=str(c["optimizer"].item()),
        schedule=HF_LR_SCHEDULERS[str(c["lr_schedule"].item())],
        warmup=int(c["warmup_steps"]),
        grad_clip=None if math.isnan(clip) else clip,
        betas=(float(c["adam_beta1"]), float(c["adam_beta2"])),
        eps=float(c["adam_eps"]),
        weight_decay=float(c["weight_decay"]),
        temperature=float(temperature),
        a0_norm=float(ds["a0_op"].sel(layer=head_layer)),
    )


class _Rows(list):
    """Collects BoundRows of one run with its tolerance; `kind` (KINDS) is required on every row."""

    def __init__(self, run: str, rtol: float):
        super().__init__()
        self.run, self.rtol = run, rtol

    def holds(self, measured: np.ndarray, bound: np.ndarray | float) -> bool:
        """measured ≤ bound·(1 + rtol) + ATOL everywhere; a NaN on either side compares False: never holds."""
        return bool(np.all(np.asarray(measured) <= np.asarray(bound) * (1 + self.rtol) + ATOL))

    def whole(
        self, bound: str, direction: str, tau, measured, bound_value: float, note: str = "", *, kind: str
    ) -> None:
        """A bound on every token at once: compare the largest measured value (NaN if any is NaN) with it."""
        measured = np.asarray(measured, float)
        if not measured.size:
            self.na(bound, direction, tau, "no tokens measured", kind=kind)
            return
        m = float(np.max(measured))
        self._add(kind, bound, direction, tau, m, float(bound_value), self.holds(m, bound_value), note)

    def per_token(
        self, bound: str, direction: str, tau, measured, bounds, note: str = "", *, kind: str
    ) -> None:
        """A bound per token: show the token with the largest measured/bound (a NaN one first); holds iff
        every token holds."""
        measured, bounds = np.broadcast_arrays(np.asarray(measured, float), np.asarray(bounds, float))
        if not len(measured):
            self.na(bound, direction, tau, "no tokens measured", kind=kind)
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bounds > 0, measured / bounds, np.where(measured <= ATOL, 0.0, np.inf))
        ratio[np.isnan(measured) | np.isnan(bounds)] = np.nan  # np.argmax picks the first NaN
        t = int(np.argmax(ratio))
        holds = self.holds(measured, bounds)
        self._add(kind, bound + " [tightest token]", direction, tau, measured[t], bounds[t], holds, note)

    def na(self, bound: str, direction: str, tau, note: str, holds: bool | None = None, *, kind: str) -> None:
        self._add(kind, bound, direction, tau, math.nan, math.nan, holds, note)

    def _add(self, kind: str, bound: str, direction: str, tau, measured, bound_value, holds, note) -> None:
        if kind not in KINDS:
            raise ValueError(f"row kind {kind!r} is not one of {list(KINDS)}")
        self.append(
            BoundRow(self.run, kind, bound, direction, tau, float(measured), float(bound_value), holds, note)
        )


def bound_rows(
    name: str,
    meas: TokenMeasurement,
    ds: xr.Dataset,
    *,
    head_factors: tuple[np.ndarray, np.ndarray, float] | None,
    head_layer: str,
    scale_inputs: float = 1.0,
    rtol: float = 1e-5,
) -> list[BoundRow]:
    """Every bound that applies to the run (module docstring), with its magnitude input multiplied by scale_inputs.

    head_factors: (B, A, s) of the adapted lm_head for head-only runs (ΔW = s·B·A), else None.
    """
    c = float(scale_inputs)
    rows = _Rows(name, rtol)
    radius = None if meas.norm_gain is None else rmsnorm_radius(meas.norm_gain)  # P2: √d·max|g|
    if radius is not None:
        for label, norms in (
            ("||x_t|| <= R = sqrt(d)max|g| (P2)", meas.x_norm),
            ("||x_base_t|| <= R (P2)", meas.x_base_norm),
        ):
            rows.whole(label, "||x||", None, norms, c * radius, meas.norm_note, kind="lemma")
    shift = {"head-only": "dW x_t", "backbone": "W_lm dh_t"}.get(meas.kind, "z_t")
    for tau, m in meas.per_tau.items():
        per_token_k = kl_sharp_bound(c * meas.shift_range / tau)  # softmax_kl.md L3, z_t the exact shift
        for key, direction in KL_DIRECTIONS.items():
            rows.per_token(f"K(range({shift})/tau) (L3)", direction, tau, m[key], per_token_k, kind="lemma")
        if meas.kind == "backbone":  # credit link, aposteriori.md P4 (L6 for its first inequality)
            alpha_div = np.abs(m["logp_diff"])
            L = float(ds["w_lm_op_norm"])
            rows.per_token(
                "alpha_div <= range(W_lm dh_t)/tau (L6)",
                "|dlogp(y)|",
                tau,
                alpha_div,
                c * meas.shift_range / tau,
                kind="lemma",
            )
            rows.per_token(
                "alpha_div <= sqrt2 ||W_lm|| ||dh_t||/tau (P4)",
                "|dlogp(y)|",
                tau,
                alpha_div,
                math.sqrt(2) * L * c * meas.dh_norm / tau,
                kind="bound",
            )
        if meas.kind != "head-only" or head_factors is None:
            continue
        B, A, s = head_factors
        R = radius if radius is not None else float(np.max(meas.x_norm, initial=0.0))
        note = (
            "R covers every prompt" if radius is not None else f"R = max measured ||x_t|| ({meas.norm_note})"
        )
        ball = aposteriori_kl_bound(B=B, A=A, scale=s, input_radius=c * R, temperature=tau)  # P1/P3
        prior = _apriori(ds, head_layer, c * R, tau)  # A6/A7
        for key, direction in KL_DIRECTIONS.items():
            rows.whole(
                "K(R D(dW)/tau) ball (P3)",
                direction,
                tau,
                m[key],
                ball["kl_" + _dir(key)],
                note,
                kind="bound",
            )
            if isinstance(prior, str):
                rows.na("a-priori K(rho) (A6/A7)", direction, tau, prior, kind="bound")
            else:
                bound = prior["kl_" + _dir(key)]
                rows.whole("a-priori K(rho) (A6/A7)", direction, tau, m[key], bound, note, kind="bound")
    if meas.kind == "head-only":
        err, tol, n = schedule_error(ds)  # a NaN (no step recorded) fails
        note = f"max |recorded lr - lr*lambda(t)| over {n} steps vs 1e-6 lr"
        rows.whole("a-priori input: lr schedule (A2)", "|lr diff|", None, [err], tol, note, kind="input")
    else:
        note = "n/a: the single-layer theory covers head-only LoRA only"
        rows.na("a-priori (A6/A7)", "-", None, note, kind="bound")
    return list(rows)


def _dir(key: str) -> str:
    """kl_policy_ref -> "theta_ref" (KL(π_θ‖π_ref)), kl_ref_policy -> "ref_theta", the theory's key names."""
    return "theta_ref" if key == "kl_policy_ref" else "ref_theta"


def _apriori(ds: xr.Dataset, head_layer: str, radius: float, tau: float) -> dict[str, Any] | str:
    try:
        return apriori_kl_bound(apriori_inputs(ds, head_layer, radius, tau))
    except ValueError as err:  # e.g. SGD without clipping: the theory has no a-priori bound
        return f"n/a: {err}"


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunVerification:
    run_dir: Path
    rows: list[BoundRow]
    measurement: TokenMeasurement
    config: RunConfig = field(repr=False)


def verify_run(
    run_dir: str | Path,
    *,
    name: str | None = None,
    prompts: int | None = None,
    samples: int = 1,
    greedy: bool = False,
    seed: int = 0,
    scale_inputs: float = 1.0,
    device: str | None = None,
    dtype: str | None = None,
    keep_inputs: bool = False,
) -> RunVerification:
    """Measure per-token KL of one run's adapter on held-out prompts and evaluate every applicable bound."""
    from arca_lab.run import EVAL_SEED, load_task

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ValueError(
            f"{run_dir} is not a run directory: it needs config.json and run.nc (`arca-lab train`)"
        )
    if not (run_dir / "adapter").is_dir():
        raise ValueError(f"{run_dir} has no adapter/ directory: was the run written by `arca-lab train`?")
    if not scale_inputs > 0:
        raise ValueError(f"scale_inputs must be > 0 (0.5 halves every bound's input), got {scale_inputs}")
    cfg = RunConfig.from_json((run_dir / "config.json").read_text())
    cfg = dataclasses.replace(cfg, device=device or cfg.device, dtype=dtype or cfg.dtype)
    ds = load_run_variables(run_dir, RUN_INPUTS)  # not the whole run.nc: ~0.06 s instead of ~0.4 s per run
    model, tokenizer = load_policy(cfg)
    head_layer = lm_head_module_name(model)
    model = PeftModel.from_pretrained(model, run_dir / "adapter")
    task = load_task(cfg)
    rows = task.eval_rows(prompts or cfg.eval_prompts, seed=EVAL_SEED)
    taus = [1.0] + ([cfg.temperature] if cfg.temperature != 1.0 else [])
    meas = measure_tokens(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        temperatures=taus,
        max_new_tokens=cfg.max_completion_length,
        sample_temperature=cfg.temperature,
        top_p=cfg.top_p,
        samples=samples,
        greedy=greedy,
        seed=seed,
        keep_inputs=keep_inputs,
    )
    model_dtype = base_head(model).weight.dtype
    if meas.head_logit_error > (1e-3 if model_dtype == torch.float32 else 0.5):
        raise ValueError(
            f"the model's logits differ from W x + b by {meas.head_logit_error:.3g}: verify-bound needs a plain "
            "linear output layer (no logit soft-capping or scaling)"
        )
    factors = None
    if meas.kind == "head-only":
        head = lm_head_of(model)
        adapter = head.active_adapters[0]
        s = float(head.scaling[adapter])
        if not math.isclose(s, cfg.adapter_scale(), rel_tol=1e-9):
            raise ValueError(f"adapter scale {s} differs from the run config's {cfg.adapter_scale()}")
        factors = (
            head.lora_B[adapter].weight.detach().double().cpu().numpy(),
            head.lora_A[adapter].weight.detach().double().cpu().numpy(),
            s,
        )
    out = bound_rows(
        name or run_dir.name,
        meas,
        ds,
        head_factors=factors,
        head_layer=head_layer,
        scale_inputs=scale_inputs,
        rtol=RTOL.get(model_dtype, 1e-2),
    )
    return RunVerification(run_dir, out, meas, cfg)


# ---------------------------------------------------------------------------------------------- table and CLI
COLUMNS = (
    "run",
    "kind",
    "bound",
    "direction",
    "tau",
    "measured",
    "bound_value",
    "measured/bound",
    "holds",
    "note",
)


def row_dict(row: BoundRow) -> dict[str, Any]:
    return {
        "run": row.run,
        "kind": row.kind,
        "bound": row.bound,
        "direction": row.direction,
        "tau": row.tau,
        "measured": row.measured,
        "bound_value": row.bound_value,
        "measured/bound": row.ratio,
        "holds": "n/a" if row.holds is None else "NO" if row.failed else "yes",
        "note": row.note,
    }


def format_table(rows: list[BoundRow]) -> str:
    """Fixed-width table with the columns run, kind, bound, direction, tau, measured, bound, measured/bound,
    holds, note ("-" for a value a not-applicable row lacks; a checked row shows its NaNs as "nan")."""

    def num(v: float | None, checked: bool = False) -> str:
        return "-" if v is None or (not checked and math.isnan(v)) else f"{v:.4g}"

    cells = [
        ["run", "kind", "bound", "direction", "tau", "measured", "bound", "measured/bound", "holds", "note"]
    ]
    for r in rows:
        d = row_dict(r)
        checked = r.holds is not None
        cells.append(
            [
                d["run"],
                d["kind"],
                d["bound"],
                d["direction"],
                num(d["tau"]),
                num(d["measured"], checked),
                num(d["bound_value"], checked),
                num(d["measured/bound"], checked),
                d["holds"],
                d["note"],
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]) - 1)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1] for c in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def check_summary(rows: list[BoundRow], scale_inputs: float = 1.0) -> str:
    """The verdict: checked rows counted per kind (KINDS) and the violated ones named per kind. A failed lemma
    row is reported as a bug in the measurement or the theory code, unless the inputs were scaled (then it is
    what scaling is for: a lemma is exact on its own arrays, so halving its input makes it fail)."""
    checked = [r for r in rows if r.holds is not None]
    counts = ", ".join(f"{sum(r.kind == k for r in checked)} {text}" for k, text in KINDS.items())
    parts = []
    for kind in KINDS:
        failed = [f"{r.run}: {r.bound}" for r in checked if r.kind == kind and r.failed]
        if not failed:
            continue
        what = {
            "bound": "bound check(s) violated",
            "lemma": "lemma check(s) failed (expected with scaled inputs)"
            if scale_inputs != 1.0
            else "LEMMA check(s) failed: a bug in the measurement or theory code, not a bound violated",
            "input": "input check(s) failed",
        }[kind]
        parts.append(f"{len(failed)} {what}: " + "; ".join(sorted(set(failed))))
    return counts + "; " + (" | ".join(parts) if parts else "0 violated: all hold")


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="arca-lab verify-bound",
        description="Check the theory's KL bounds against trained adapters (a run directory, or every run below "
        "a sweep directory). Exit 0 if every check holds, 1 if any fails (lemma checks too), 64 on bad input.",
    )
    p.add_argument("path", type=Path, help="a run directory (config.json + run.nc) or a sweep directory")
    p.add_argument(
        "--prompts", type=int, default=None, help="held-out prompts (default: the run's eval_prompts)"
    )
    p.add_argument("--samples", type=int, default=1, help="sampled completions per prompt (default 1)")
    p.add_argument("--greedy", action="store_true", help="greedy completions instead of sampled ones")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--scale-inputs",
        type=float,
        default=1.0,
        help="multiply every check's magnitude input (R, dW, dh) by this: a falsification test (0.5 makes the "
        "lemma checks fail on trained adapters; the bound checks, 10-1000x loose there, may still hold)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: the run's")
    p.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default=None, help="default: the run's"
    )
    p.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.prompts is not None and args.prompts < 1:
            raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        runs = find_runs(args.path)
        rows: list[BoundRow] = []
        for run in runs:
            name = run.name if run == args.path else str(run.relative_to(args.path))
            rows += verify_run(
                run,
                name=name,
                prompts=args.prompts,
                samples=args.samples,
                greedy=args.greedy,
                seed=args.seed,
                scale_inputs=args.scale_inputs,
                device=args.device,
                dtype=args.dtype,
            ).rows
    except (ValueError, FileNotFoundError) as err:
        print(f"arca-lab verify-bound: error: {err}", file=sys.stderr)
        return EX_USAGE
    print(format_table(rows))
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(row_dict(r) for r in rows)
    scale = f" (inputs scaled by {args.scale_inputs:g})" if args.scale_inputs != 1.0 else ""
    print(f"verify-bound: {len(runs)} run(s){scale}: {check_summary(rows, args.scale_inputs)}")
    return 1 if any(r.failed for r in rows) else 0
