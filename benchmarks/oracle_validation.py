"""The cross-fit oracle gain (gradlocate.golden.oracle) validated on synthetic truth, at
larger scale than the tests, and on synthetic tables shaped like the committed matrices.

Part A: synthetic studies from known generating models (edits of different difficulty,
with or without per-edit optima, Gaussian or binomial noise with ceilings and ties). For
each: the declared estimand's true value by Monte Carlo, then over many studies the
estimate's mean, the interval's coverage, how often "gain > 0" is declared (p < 0.05),
how often the interval lies below 0 and the estimate above the in-sample gain; beside it
the t-interval on the per-edit cross-fit values (golden layer held fixed), the paper's
in-sample gain with its paired t-test, and the removed permutation-null correction.

Part B: the committed matrices hold one replicate (per-edit means), so the estimator
cannot run on them. As an illustration of its behaviour on tables of their shape, each
study's rows give the truth (``mu``: reliability, generalization, locality per cell, each
recorded mean smoothed toward 1/2 as a Beta(1, 1) posterior over ``K`` tokens), edits
are resampled with replacement, and two replicates are drawn as binomial token
accuracies (``K`` tokens per metric, an assumption); the score is the edit-only mean (no
damage gate). Reported: the true estimand, the true optima's gain, the estimate,
coverage, detection and equivalence (bootstrap TOST at the declared margin) rates.

    PYTHONPATH=. python benchmarks/oracle_validation.py            # ~3 min on one core
    PYTHONPATH=. python benchmarks/oracle_validation.py --quick    # fewer draws

Writes benchmarks/results/oracle/validation.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from gradlocate.golden.load import load_matrix
from gradlocate.golden.oracle import EQUIVALENCE_MARGIN, oracle_gain

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "oracle"
MATRICES = ROOT / "benchmarks" / "results" / "matrix"
LEVEL = 0.95
K = 5   # binomial tokens per metric in part B (an assumption: the records keep only means)


# --------------------------------------------------------------------------- part A: models


def _bump(rng: np.random.Generator, n: int, n_layers: int, height: float) -> np.ndarray:
    a = rng.uniform(0.2, 0.6, (n, 1))
    o = np.clip(np.round(rng.normal(0.4 * n_layers, 0.2 * n_layers, (n, 1))), 0, n_layers - 1)
    return a + height * np.exp(-(np.arange(n_layers)[None, :] - o) ** 2 / (2 * (0.15 * n_layers) ** 2))


def synthetic(name: str, rng: np.random.Generator, n: int, n_layers: int) -> tuple[np.ndarray, ...]:
    """(mu, replicate a, replicate b) of one study (as tests/test_oracle.py, any size)."""
    if name == "noise":
        mu = np.repeat(rng.uniform(0.2, 0.8, (n, 1)), n_layers, axis=1)
        sd = 0.1 * rng.uniform(0.5, 1.5, (n, 1))
        return mu, mu + sd * rng.normal(size=mu.shape), mu + sd * rng.normal(size=mu.shape)
    if name == "noise-saturated":
        mu = np.repeat(rng.uniform(0.5, 1.0, (n, 1)), n_layers, axis=1)
        return mu, rng.binomial(5, mu) / 5, rng.binomial(5, mu) / 5
    if name == "optima-saturated":
        mu = np.clip(_bump(rng, n, n_layers, 0.45) + 0.1, 0, 1)
        return mu, rng.binomial(8, mu) / 8, rng.binomial(8, mu) / 8
    mu = (rng.uniform(0.2, 0.8, (n, 1)) + np.linspace(0, 0.1, n_layers)[None, :] if name == "layer-effect"
          else _bump(rng, n, n_layers, 0.3))
    return mu, mu + 0.1 * rng.normal(size=mu.shape), mu + 0.1 * rng.normal(size=mu.shape)


def _pick(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keys = np.where(x >= x.max(axis=-1, keepdims=True), rng.random(x.shape), -1.0)
    return np.argmax(keys, axis=-1)


def truth(draw: Any, m: int, seed: int) -> tuple[float, float]:
    """(the estimand theta_n, the true optima's gain) by Monte Carlo over ``draw(rng)``."""
    rng = np.random.default_rng(seed)
    th, oracle = np.empty(m), np.empty(m)
    for k in range(m):
        mu, a, _ = draw(rng)
        own, g = _pick(a, rng), _pick(a.mean(axis=0), rng)
        th[k] = np.mean(mu[np.arange(len(mu)), own] - mu[:, g])
        oracle[k] = np.mean(mu.max(axis=1) - mu[:, int(np.argmax(mu.mean(axis=0)))])
    return float(th.mean()), float(oracle.mean())


# --------------------------------------------------------------------------- estimators


def in_sample_t(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    s = (a + b) / 2
    d = s.max(axis=1) - s[:, int(np.argmax(s.mean(axis=0)))]
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    q = sps.t.ppf((1 + LEVEL) / 2, d.size - 1)
    return m, m - q * se, m + q * se, (float(sps.t.sf(m / se, d.size - 1)) if se > 0 else float(m <= 0))


def permutation_null(a: np.ndarray, b: np.ndarray, n_null: int = 200) -> tuple[float, float, float, float]:
    """The removed gradlocate.stats.null_selection_bias, on the replicates' mean."""
    s = (a + b) / 2

    def gain(x: np.ndarray) -> float:
        return float(np.mean(x.max(axis=1) - x[:, int(np.argmax(x.mean(axis=0)))]))

    col = s.mean(axis=0)
    r = s - col[None, :]
    r = (r - r.mean(axis=1, keepdims=True)) * math.sqrt(s.shape[1] / (s.shape[1] - 1))
    rng = np.random.default_rng(0)
    null = np.array([gain(col[None, :] + np.take_along_axis(r, np.argsort(rng.random(r.shape), axis=0), axis=0))
                     for _ in range(n_null)])
    obs = gain(s)
    lo, hi = np.percentile(null, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return obs - null.mean(), obs - hi, obs - lo, float((1 + np.sum(null >= obs - 1e-12)) / (1 + n_null))


def crossfit_rows(a: np.ndarray, b: np.ndarray, n_boot: int, margin: float) -> dict[str, float]:
    with warnings.catch_warnings():  # binomial replicates of cells at 0 or 1 can coincide: a fair draw
        warnings.simplefilter("ignore", UserWarning)
        r = oracle_gain(a, b, n_boot=n_boot, level=LEVEL)
    d = r.per_edit
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    q = sps.t.ppf((1 + LEVEL) / 2, d.size - 1)
    return {"gain": r.gain, "lo": r.ci[0], "hi": r.ci[1], "p": r.p, "in_sample": r.in_sample,
            "t_lo": r.gain - q * se, "t_hi": r.gain + q * se,
            "t_p": float(sps.t.sf(r.gain / se, d.size - 1)) if se > 0 else float(r.gain <= 0),
            "equivalent": float(r.equivalence(margin).equivalent)}


def summarise(rows: list[dict[str, float]], theta: float) -> dict[str, float]:
    x = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out = {"draws": len(rows), "mean": float(x["gain"].mean()),
           "se": float(x["gain"].std(ddof=1) / math.sqrt(len(rows))),
           "coverage": float(np.mean((x["lo"] <= theta) & (theta <= x["hi"]))),
           "positive": float(np.mean(x["p"] < 0.05)), "ci_below_0": float(np.mean(x["hi"] < 0)),
           "ci_width": float(np.mean(x["hi"] - x["lo"]))}
    if "t_lo" in x:
        out |= {"t_coverage": float(np.mean((x["t_lo"] <= theta) & (theta <= x["t_hi"]))),
                "t_positive": float(np.mean(x["t_p"] < 0.05)),
                "above_in_sample": float(np.mean(x["gain"] > x["in_sample"] + 1e-12)),
                "ci_above_in_sample": float(np.mean(x["lo"] > x["in_sample"] + 1e-12)),
                "in_sample": float(x["in_sample"].mean()), "equivalent": float(x["equivalent"].mean())}
    return out


# --------------------------------------------------------------------------- the parts


SCENARIOS = [("noise", 40, 10), ("noise-saturated", 40, 10), ("layer-effect", 40, 10), ("optima", 40, 10),
             ("optima-saturated", 40, 10), ("optima", 96, 30), ("noise-saturated", 96, 30)]


def part_a(draws: int, n_boot: int, mc: int, null_draws: int) -> list[dict[str, Any]]:
    out = []
    for i, (name, n, n_layers) in enumerate(SCENARIOS):
        def draw(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
            return synthetic(name, rng, n, n_layers)

        theta, oracle = truth(draw, mc, seed=100 + i)
        rng = np.random.default_rng(200 + i)
        studies = [draw(rng)[1:] for _ in range(draws)]
        cf = summarise([crossfit_rows(a, b, n_boot, EQUIVALENCE_MARGIN) for a, b in studies], theta)
        keys = ("gain", "lo", "hi", "p")
        ins = summarise([dict(zip(keys, in_sample_t(a, b))) for a, b in studies], theta)
        null = summarise([dict(zip(keys, permutation_null(a, b))) for a, b in studies[:null_draws]], theta)
        out.append({"scenario": name, "edits": n, "layers": n_layers, "theta": theta, "true_optima_gain": oracle,
                    "crossfit": cf, "in_sample_t": ins, "permutation_null": null})
        print(f"A {name} {n}x{n_layers}: theta {theta:.4f} crossfit {cf['mean']:.4f} cover {cf['coverage']:.3f} "
              f"pos {cf['positive']:.3f}", flush=True)
    return out


def _edit_only(metrics: list[np.ndarray]) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        stack = np.stack(metrics)
        return np.nansum(stack, axis=0) / np.sum(~np.isnan(stack), axis=0)


def _real_draw(metrics: list[np.ndarray]) -> Any:
    """A study shaped like the record: each cell's truth is its recorded mean smoothed
    as a Beta(1, 1) posterior mean over ``K`` tokens, ``(K x + 1) / (K + 2)`` (a recorded
    0 or 1 is itself one noisy measurement, not a certainty), edits resampled, and two
    binomial replicates drawn."""
    smooth = [(K * m + 1) / (K + 2) for m in metrics]

    def draw(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        rows = rng.integers(0, smooth[0].shape[0], smooth[0].shape[0])
        mu = [m[rows] for m in smooth]
        reps = [[np.where(np.isnan(m), np.nan, rng.binomial(K, np.nan_to_num(m)) / K) for m in mu] for _ in range(2)]
        return _edit_only(mu), _edit_only(reps[0]), _edit_only(reps[1])
    return draw


def part_b(draws: int, n_boot: int, mc: int) -> list[dict[str, Any]]:
    out = []
    for i, folder in enumerate(sorted(p for p in MATRICES.iterdir() if (p / "edits.json").exists())):
        m, _ = load_matrix(folder, 18 if "gemma" in folder.name else 30)
        metrics = [np.asarray(m.scores[k], dtype=np.float64) for k in ("reliability", "generalization", "locality")]
        real = _edit_only(metrics)
        g = int(np.argmax(np.nanmean(real, axis=0)))
        draw = _real_draw(metrics)
        theta, oracle = truth(draw, mc, seed=300 + i)
        rng = np.random.default_rng(400 + i)
        studies = [draw(rng)[1:] for _ in range(draws)]
        cf = summarise([crossfit_rows(a, b, n_boot, EQUIVALENCE_MARGIN) for a, b in studies], theta)
        out.append({"study": folder.name, "edits": int(real.shape[0]), "layers": int(real.shape[1]),
                    "in_sample_on_the_record": float(np.nanmean(np.nanmax(real, axis=1) - real[:, g])),
                    "theta": theta, "true_optima_gain": oracle, "crossfit": cf})
        print(f"B {folder.name}: theta {theta:.4f} crossfit {cf['mean']:.4f} cover {cf['coverage']:.3f}", flush=True)
    return out


# --------------------------------------------------------------------------- report


def _f(x: float, pct: bool = False) -> str:
    return f"{100 * x:.1f} %" if pct else f"{x:+.4f}"


def markdown(a: list[dict[str, Any]], b: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = ["# Oracle gain: validation on synthetic truth", "",
             f"`PYTHONPATH=. python benchmarks/oracle_validation.py` ({settings['draws']} studies per row, "
             f"{settings['n_boot']} resamples, level {LEVEL}, truth by Monte Carlo over {settings['mc']} fresh "
             f"studies; permutation null on the first {settings['null_draws']}).", "",
             "theta: the declared estimand (`gradlocate.golden.oracle.ESTIMAND`); optima: the true per-edit optima's "
             "gain (never negative, not estimable). 'p<.05': share of studies declaring gain > 0. Cross-fit columns: "
             "`oracle_gain`; t: a t-interval on its per-edit values (golden layer held fixed); in-sample: the paper's "
             "reading (own best and golden layer on the same table, paired t); null: the removed permutation-null "
             "correction.", "",
             "| scenario | edits x layers | theta | optima | cross-fit mean | coverage | p<.05 | CI < 0 | > in-sample "
             "| CI > in-sample | t coverage | in-sample mean | in-sample coverage | in-sample p<.05 | null mean | "
             "null coverage | null p<.05 |", "|" + "---|" * 17]
    for r in a:
        c, i, n = r["crossfit"], r["in_sample_t"], r["permutation_null"]
        lines.append(f"| {r['scenario']} | {r['edits']} x {r['layers']} | {_f(r['theta'])} | {_f(r['true_optima_gain'])} "
                     f"| {_f(c['mean'])} | {_f(c['coverage'], True)} | {_f(c['positive'], True)} "
                     f"| {_f(c['ci_below_0'], True)} | {_f(c['above_in_sample'], True)} "
                     f"| {_f(c['ci_above_in_sample'], True)} | {_f(c['t_coverage'], True)} | {_f(i['mean'])} "
                     f"| {_f(i['coverage'], True)} | {_f(i['positive'], True)} | {_f(n['mean'])} "
                     f"| {_f(n['coverage'], True)} | {_f(n['positive'], True)} |")
    lines += ["", "## Tables shaped like the committed matrices (illustration)", "",
              f"Each study's per-edit means, smoothed as a Beta(1, 1) posterior over {K} tokens, taken as the truth; "
              f"edits resampled; two replicates drawn as binomial token accuracies ({K} tokens per metric, assumed); "
              f"primary score edit-only without the damage gate. The recorded means carry their own noise, which this "
              f"truth counts as per-edit structure: the gains here are not estimates of the studies' gains. "
              f"'equivalent': share of studies where the bootstrap TOST declares |gain| < {EQUIVALENCE_MARGIN}.", "",
              "| study | edits x layers | in-sample on the record | optima | theta | cross-fit mean | CI width "
              "| coverage | p<.05 | equivalent | in-sample mean |", "|" + "---|" * 11]
    for r in b:
        c = r["crossfit"]
        lines.append(f"| {r['study']} | {r['edits']} x {r['layers']} | {_f(r['in_sample_on_the_record'])} "
                     f"| {_f(r['true_optima_gain'])} | {_f(r['theta'])} | {_f(c['mean'])} | {c['ci_width']:.4f} "
                     f"| {_f(c['coverage'], True)} "
                     f"| {_f(c['positive'], True)} | {_f(c['equivalent'], True)} | {_f(c['in_sample'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer draws (a smoke run; not for the record)")
    args = ap.parse_args()
    s = ({"draws": 60, "n_boot": 500, "mc": 500, "null_draws": 20, "real_draws": 30} if args.quick else
         {"draws": 1000, "n_boot": 1000, "mc": 4000, "null_draws": 100, "real_draws": 200})
    print(f"oracle validation: {len(SCENARIOS)} synthetic scenarios x {s['draws']} studies and the committed "
          f"matrices' shapes x {s['real_draws']} (a few minutes on one core)", flush=True)
    t0 = time.time()
    a = part_a(s["draws"], s["n_boot"], s["mc"], s["null_draws"])
    b = part_b(s["real_draws"], s["n_boot"], s["mc"] // 4)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "validation_quick" if args.quick else "validation"
    (OUT / f"{name}.json").write_text(json.dumps({"settings": s, "level": LEVEL, "tokens_per_metric": K,
                                                  "synthetic": a, "shaped_like_matrices": b,
                                                  "seconds": round(time.time() - t0, 1)}, indent=1))
    (OUT / f"{name}.md").write_text(markdown(a, b, s))
    print(f"wrote {OUT / name}.md/.json in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
