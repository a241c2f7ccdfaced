"""Calibrate the two constants of the KL law (theory/kl_law.py, theory/rank_scaling.md §10) on the single-layer
bandit, then compare the law with a separate held-out bandit grid. Prints tables; it is not a test.

Run: ``python benchmarks/calibrate_kl_law.py [--seeds 16] [--no-fit] [--shift adam_coherence=10]``
(run time printed at the end).

1. Calibration grid (seeds 100..100+S−1): d = 128, R = √d, V ∈ {2, 8 (π_ref logit std 2)}, AdamW (T = 12,
   λ = 0.01) at Adam reach ηT√(3 d r_max) ∈ {0.1, 1, 4, 15, 50}, clipped SGD (T = 8, c = 10⁻³) at path length
   c·lr·T ∈ {0.01, 0.1, 0.5, 2, 6}; α/r scaling with α = 2r; ranks 1..16. The constants (ζ, c_coh) minimise
   Σ (log10 measured − log10 predicted)² of the mean KL(π_ref‖π_θ) over these points (Nelder–Mead in log space,
   from the prior values). `--no-fit` skips this and uses kl_law.CONSTANTS.
2. Held-out grid (seeds 0..S−1, other d, other lrs): d ∈ {64, 256}, V ∈ {2, 8 (logit std 2)}, AdamW reach ∈
   {0.05, 0.2, 0.7, 2.5, 8, 25, 80} (r_max = 32), clipped SGD c·lr·T ∈ {0.003, 0.01, …, 3, 10};
   ranks 1..32; plus rslora / const scaling with α = 16 (V = 2, d = 256, three lrs per optimiser).
Measured: per seed the mean over 512 fresh isotropic contexts (‖x‖ = R) of the exact KL in both directions
(bandit.kl_pair) after the last step, then the mean over seeds. Predicted: kl_law.predict_kl from the run's
BoundInputs (a0_op None: E over A₀), N = 32 contexts per step and ref_logit_std = the run's π_ref logit std.
Per regime (the law's label) the table gives the median and the worst |log10(measured/predicted)| and the
fraction of points within 2×. `--shift NAME=FACTOR` multiplies one constant (after the fit), to show the
comparison failing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import minimize

from theory import kl_law
from theory.bandit import BanditSpec, kl_pair, simulate_ranks
from theory.cli import _single_thread_blas

W0_STD = 2.0  # π_ref logit std of the V = 8 rows (as `theory check`'s V = 8 rows)
N_CTX, K_SAMPLES, CLIP = 32, 8, 1e-3
ADAM_T, SGD_T = 12, 8
PRIORS = {"snr_zeta": 0.68, "adam_coherence": 0.3}  # rank_scaling.md §10.2 / §10.5, the fit's starting point


def spec_for(opt: str, V: int, d: int, level: float, scaling: str = "alpha/r") -> BanditSpec:
    """lr from the grid level: Adam reach ηT√(3 d·32), or SGD path length c·lr·T."""
    adam = opt == "adamw"
    T = ADAM_T if adam else SGD_T
    lr = level / (T * np.sqrt(3 * d * 32)) if adam else level / (CLIP * T)
    return BanditSpec(
        vocab_size=V, in_features=d, rank=1, alpha=2.0, scaling=scaling, optimizer=opt, lr=float(lr), steps=T,
        grad_clip=None if adam else CLIP, weight_decay=0.01 if adam else 0.0, input_radius=float(np.sqrt(d)),
        contexts_per_step=N_CTX, samples_per_context=K_SAMPLES, w0_scale=W0_STD if V > 2 else 0.0, n_eval=8,
    )  # fmt: skip


def measure(spec: BanditSpec, seeds: list[int], ranks: list[int], alpha_rule: str) -> list[dict]:
    """One point per rank: mean-over-contexts KL both directions (mean over seeds) and diagnostics."""
    alphas = [2.0 * r if alpha_rule == "2r" else 16.0 for r in ranks]
    runs = simulate_ranks(spec, seeds, ranks, alphas, ball_starts=1, ball_iters=0)
    rng = np.random.default_rng(12345 + spec.in_features)
    x = rng.standard_normal((512, spec.in_features))
    x *= spec.input_radius / np.linalg.norm(x, axis=-1, keepdims=True)
    out = []
    for run in runs:
        s, tau = run.spec.scale, run.spec.temperature
        a = x @ run.W0.swapaxes(-1, -2) / tau  # (S, 512, V)
        z = s * (x @ run.A.swapaxes(-1, -2)) @ run.B.swapaxes(-1, -2) / tau
        fwd, bwd = kl_pair(a, z)
        clipped = np.mean(run.grad_norm > spec.grad_clip) if spec.grad_clip is not None else np.nan
        out.append({"spec": run.spec, "fwd": float(fwd.mean()), "bwd": float(bwd.mean()),
                    "range": float(np.mean(np.max(z, -1) - np.min(z, -1))), "clipped": float(clipped)})  # fmt: skip
    return out


def predict(point: dict, constants: dict[str, float]) -> dict:
    sp_ = point["spec"]
    return kl_law.predict_kl(sp_.bound_inputs(), contexts_per_step=N_CTX, ref_logit_std=sp_.w0_scale,
                             constants=constants, with_crossovers=False)  # fmt: skip


def log_err(points: list[dict], constants: dict[str, float], key: str = "kl_ref_theta") -> np.ndarray:
    meas = "fwd" if key == "kl_ref_theta" else "bwd"
    return np.array([np.log10(p[meas] / predict(p, constants)[key]) for p in points])


def grid(name: str, seeds: list[int], configs: list[tuple], ranks: list[int]) -> list[dict]:
    t0, pts = time.time(), []
    for opt, V, d, level, scaling, rule in configs:
        for p in measure(spec_for(opt, V, d, level, scaling), seeds, ranks, rule):
            pts.append(p | {"opt": opt, "level": level, "rule": rule})
    print(
        f"{name}: {len(configs)} configurations x {len(ranks)} ranks x {len(seeds)} seeds in {time.time() - t0:.0f} s"
    )
    return pts


def calibration_configs() -> list[tuple]:
    out = [("adamw", V, 128, lv, "alpha/r", "2r") for V in (2, 8) for lv in (0.1, 1.0, 4.0, 15.0, 50.0)]
    return out + [("sgd", V, 128, lv, "alpha/r", "2r") for V in (2, 8) for lv in (0.01, 0.1, 0.5, 2.0, 6.0)]


def heldout_configs() -> list[tuple]:
    out = [("adamw", V, d, lv, "alpha/r", "2r") for V in (2, 8) for d in (64, 256)
           for lv in (0.05, 0.2, 0.7, 2.5, 8.0, 25.0, 80.0)]  # fmt: skip
    out += [("sgd", V, d, lv, "alpha/r", "2r") for V in (2, 8) for d in (64, 256)
            for lv in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)]  # fmt: skip
    out += [("adamw", 2, 256, lv, sc, "fixed") for sc in ("rslora", "const") for lv in (0.2, 2.5, 25.0)]
    return out + [("sgd", 2, 256, lv, sc, "fixed") for sc in ("rslora", "const") for lv in (0.01, 0.1, 1.0)]


def fit(points: list[dict]) -> dict[str, float]:
    def loss(theta: np.ndarray) -> float:
        c = {"snr_zeta": float(np.exp(theta[0])), "adam_coherence": float(np.exp(theta[1]))}
        return float(np.sum(log_err(points, c) ** 2))

    x0 = np.log([PRIORS["snr_zeta"], PRIORS["adam_coherence"]])
    res = minimize(loss, x0, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-6, "maxiter": 400})
    c = {"snr_zeta": float(np.exp(res.x[0])), "adam_coherence": float(np.exp(res.x[1]))}
    print(
        f"fit: {c}  (sum of squared log10 errors {res.fun:.3f} on {len(points)} points, {res.nfev} evaluations)"
    )
    return c


def report(points: list[dict], constants: dict[str, float], title: str) -> None:
    print(f"\n{title}  constants = {constants}")
    print(f"{'opt':5s} {'sc':7s} {'V':>2s} {'d':>3s} {'lr':>9s} {'r':>3s} {'regime':10s} {'KL(ref||th)':>11s} "
          f"{'pred':>9s} {'m/p':>6s} {'KL(th||ref)':>11s} {'pred':>9s} {'m/p':>6s} {'range':>6s} {'clip':>4s}")  # fmt: skip
    rows = {}
    for p in points:
        pr, sp_ = predict(p, constants), p["spec"]
        rf, rb = p["fwd"] / pr["kl_ref_theta"], p["bwd"] / pr["kl_theta_ref"]
        rows.setdefault(pr["regime"], []).append((np.log10(rf), np.log10(rb), p, pr))
        print(f"{p['opt']:5s} {sp_.scaling[:7]:7s} {sp_.vocab_size:2d} {sp_.in_features:3d} {sp_.lr:9.3g} {sp_.rank:3d} "
              f"{pr['regime']:10s} {p['fwd']:11.3e} {pr['kl_ref_theta']:9.3e} {rf:6.2f} {p['bwd']:11.3e} "
              f"{pr['kl_theta_ref']:9.3e} {rb:6.2f} {p['range']:6.2f} {p['clipped']:4.2f}")  # fmt: skip
    print(f"\n{'regime':10s} {'n':>4s} {'median|log10| fwd':>18s} {'bwd':>6s} {'worst fwd':>10s} {'worst bwd':>10s} "
          f"{'within 2x fwd':>14s} {'bwd':>6s}")  # fmt: skip
    for regime in ("small_step", "coherent", "saturated"):
        r = rows.get(regime, [])
        if not r:
            print(f"{regime:10s} {0:4d}")
            continue
        ef, eb = np.abs([x[0] for x in r]), np.abs([x[1] for x in r])
        print(f"{regime:10s} {len(r):4d} {np.median(ef):18.3f} {np.median(eb):6.3f} {ef.max():10.3f} {eb.max():10.3f} "
              f"{np.mean(ef <= np.log10(2)):14.2f} {np.mean(eb <= np.log10(2)):6.2f}")  # fmt: skip
    groups: dict[tuple, list[float]] = {}
    for regime, r in rows.items():
        for x in r:
            groups.setdefault((x[2]["opt"], x[2]["spec"].vocab_size, regime), []).append(x[0])
    print("median signed log10(measured/predicted), KL(ref||th), by optimiser, V and regime:")
    for key, v in sorted(groups.items()):
        print(
            f"  {key[0]:5s} V={key[1]:<2d} {key[2]:10s} n={len(v):3d} median {np.median(v):+.2f}  range [{min(v):+.2f}, {max(v):+.2f}]"
        )
    for regime, r in rows.items():
        worst = max(r, key=lambda x: abs(x[0]))
        sp_ = worst[2]["spec"]
        print(f"worst {regime}: {worst[2]['opt']} V={sp_.vocab_size} d={sp_.in_features} lr={sp_.lr:.3g} r={sp_.rank} "
              f"{sp_.scaling}: measured/predicted = {10 ** worst[0]:.3g} (fwd), {10 ** worst[1]:.3g} (bwd)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument(
        "--shift", default=None, help="NAME=FACTOR: multiply one constant before the held-out report"
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    with _single_thread_blas():
        constants = dict(kl_law.CONSTANTS)
        if not args.no_fit:
            cal = grid(
                "calibration grid",
                list(range(100, 100 + args.seeds)),
                calibration_configs(),
                [1, 2, 4, 8, 16],
            )
            constants = fit(cal)
            report(cal, constants, "Calibration grid (in-sample)")
        if args.shift:
            name, factor = args.shift.split("=")
            constants = replace_constant(constants, name, float(factor))
        held = grid("held-out grid", list(range(args.seeds)), heldout_configs(), [1, 2, 4, 8, 16, 32])
        report(held, constants, "Held-out grid")
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


def replace_constant(constants: dict[str, float], name: str, factor: float) -> dict[str, float]:
    if name not in constants:
        raise SystemExit(f"unknown constant {name!r}; one of {sorted(constants)}")
    return constants | {name: constants[name] * factor}


if __name__ == "__main__":
    raise SystemExit(main())
