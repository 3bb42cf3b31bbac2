"""Figure 2: Kendall's tau of final accuracy with forgetting, task-information change and sharpness.

`python -m pf_jax.analysis forgetting --workdirs W1 W2 ... --out DIR` writes
- `DIR/forgetting.csv`: one row per (panel, adjusted threshold): tau, permutation p-value and 95%
  percentile-bootstrap interval (runs resampled) of accuracy with the run-averaged forgetting
  I(X;Y^|Y) - I(X;Y^p|Y), with the task-information change I(Y^;Y) - I(Y^p;Y), and (constant
  over thresholds) with sharpness;
- `DIR/figure2.png`: tau against adjusted threshold, one panel per perturbation type (runs are
  grouped by SAM framework and perturbation, so each panel is an m sweep, and by training
  dataset where the runs span several), solid lines where
  p <= 0.05 and dotted elsewhere, sharpness as a horizontal line, and a hatch where forgetting's
  correlation is significant and larger than the magnitude of sharpness's (our reading of "where
  forgetting correlates with generalization more strongly than flatness").

- `DIR/forgetting_runs.csv`: one row per (run, adjusted threshold): the run's m, seed, test
  accuracy, sharpness, forgetting and task-information change, the numbers each tau ranks
  (written whatever the number of runs, so one run's analysis is there too).

- `DIR/figure2.md`: the tables of the pool (`summary`): accuracy and sharpness per (panel, m)
  over the seeds; per panel, sharpness's tau, and each curve's largest |tau| over the thresholds
  with the family-wise permutation p of "some threshold correlates", Holm-adjusted.

`python -m pf_jax.analysis forgetting --runs_csv DIR/forgetting_runs.csv --out DIR` rewrites
the other three from that file alone (no run folders: the committed pool's data is enough).

A rank correlation of fewer than `MIN_RUNS` runs is not a result: such a panel is drawn greyed
and marked "too few runs", its CSV rows say so (`too_few_runs`), and a line on stderr names it. A
panel without any defined tau (one run, or runs of equal accuracy) is drawn greyed and empty, and
a line on stderr says why; the sharpness line is drawn only where sharpness was measured on at
least 2 runs of the panel (its legend says on how many).
"""

import csv
import os
import sys

import numpy as np

from pf_jax import reporting
from pf_jax.analysis import correlation
from pf_jax.analysis import forgetting
from pf_jax.analysis import paired
from pf_jax.analysis import pool

SIGNIFICANT = 0.05
MIN_RUNS = 4  # fewer runs per panel: drawn marked "too few runs", not presented as a result
MEASURES = ("forgetting", "task_information", "sharpness")
CURVES = MEASURES[:2]  # measured at every adjusted threshold
# Per measure: tau, its permutation p and its bootstrap interval (lo, hi; correlation.py); per
# curve, the family-wise p of its largest |tau| over the thresholds ("p_any", constant).
COLUMNS = (
  ("panel", "adjusted_threshold", "runs", "too_few_runs")
  + tuple(f"{k}_{m}" for m in MEASURES for k in ("tau", "p", "lo", "hi"))
  + tuple(f"p_any_{m}" for m in CURVES)
)


def panels(runs: list[pool.Run]) -> dict[str, list[pool.Run]]:
  """Runs by SAM framework and perturbation (an m sweep), and by training dataset where several
  are pooled: a rank correlation across datasets would compare unlike accuracies."""
  out: dict[str, list[pool.Run]] = {}
  datasets = [r.dataset for r in runs]
  for run in runs:
    key = f"{run.algo} {run.perturbation}" + pool.dataset_tag(run.dataset, datasets)
    out.setdefault(key, []).append(run)
  return out


def panel_arrays(runs: list[pool.Run]) -> dict[str, np.ndarray]:
  """A panel's runs as the arrays `correlations` ranks: accuracy and sharpness [runs] (NaN where
  not measured), forgetting and task-information change [runs, adjusted thresholds], and each
  run's workdir, m and seed."""
  measures = [pool.run_forgetting(r) for r in runs]
  return {
    "workdir": np.array([r.workdir for r in runs]),
    "m": np.array([r.m for r in runs]),
    "seed": np.array([r.config["seed"] for r in runs]),
    "accuracy": np.array([r.test_accuracy for r in runs]),
    "sharpness": np.array([np.nan if r.sharpness is None else r.sharpness for r in runs]),
    "forgetting": np.stack([m[0] for m in measures]),
    "task_information": np.stack([m[1] for m in measures]),
  }


def correlations(
  panel: dict[str, np.ndarray], *, num_permutations: int, seed: int, num_resamples: int = 2000
) -> dict[str, np.ndarray]:
  """tau, permutation p and bootstrap interval of accuracy with each measure at each adjusted
  threshold (sharpness: one value, repeated), for one panel's arrays (`panel_arrays`)."""
  accuracy, out = panel["accuracy"], {}

  def stats(x, ys):  # [columns, (tau, p, lo, hi)] and the family-wise p over the columns
    if len(x) < 2:
      return np.full((ys.shape[1], 4), np.nan), np.nan
    taus = [correlation.kendall_tau(x, y) for y in ys.T]
    p, p_any = correlation.permutation_pvalues(x, ys, num_permutations=num_permutations, seed=seed)
    ci = correlation.bootstrap_intervals(x, ys, num_resamples=num_resamples, seed=seed)
    return np.column_stack([taus, p, ci]), p_any

  known = ~np.isnan(panel["sharpness"])
  for name in MEASURES:
    if name == "sharpness":  # one value, repeated at every threshold
      values, _ = stats(accuracy[known], panel["sharpness"][known][:, None])
      values = np.repeat(values, forgetting.NUM_ADJUSTED, axis=0)
    else:
      values, p_any = stats(accuracy, panel[name])  # [thresholds, 4]
      out[f"p_any_{name}"] = np.full(forgetting.NUM_ADJUSTED, p_any)
    for i, k in enumerate(("tau", "p", "lo", "hi")):
      out[f"{k}_{name}"] = values[:, i]
  out["sharpness_runs"] = int(known.sum())
  return out


RUN_COLUMNS = (
  "panel",
  "workdir",
  "m",
  "seed",
  "test_accuracy",
  "sharpness",
  "adjusted_threshold",
  "forgetting",
  "task_information_change",
)


def write_runs_csv(path: str, groups: dict[str, dict[str, np.ndarray]]) -> None:
  """The per-run table: each run's measures at each adjusted threshold (all Figure 2 ranks)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(RUN_COLUMNS)
    for panel, a in groups.items():
      for r in range(len(a["accuracy"])):
        sharp = "" if np.isnan(a["sharpness"][r]) else f"{a['sharpness'][r]:.6g}"
        head = [panel, a["workdir"][r], a["m"][r], a["seed"][r], f"{a['accuracy'][r]:.6g}", sharp]
        for i, t in enumerate(forgetting.ADJUSTED_THRESHOLDS):
          tail = [f"{a['forgetting'][r, i]:.6g}", f"{a['task_information'][r, i]:.6g}"]
          writer.writerow(head + [f"{t:.2f}"] + tail)


def read_runs_csv(path: str) -> dict[str, dict[str, np.ndarray]]:
  """`write_runs_csv`'s file back as {panel: arrays}: Figure 2 again without the run folders."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if missing := [c for c in RUN_COLUMNS if c not in (reader.fieldnames or ())]:
      raise ValueError(
        f"{path}: no column {', '.join(missing)} (a forgetting_runs.csv of `python -m "
        "pf_jax.analysis forgetting --workdirs ...` has " + ", ".join(RUN_COLUMNS) + ")"
      )
    rows = list(reader)
  groups: dict[str, dict[str, list]] = {}
  for row in rows:  # one row per (run, threshold), in write_runs_csv's order
    g = groups.setdefault(row["panel"], {"runs": {}})
    g["runs"].setdefault(row["workdir"], []).append(row)
  out = {}
  for panel, g in groups.items():
    runs = list(g["runs"].values())
    if any(len(r) != forgetting.NUM_ADJUSTED for r in runs):
      raise ValueError(f"{path}: a run of panel {panel!r} lacks some of the 101 thresholds")
    first = [r[0] for r in runs]
    out[panel] = {
      "workdir": np.array([r["workdir"] for r in first]),
      "m": np.array([int(r["m"]) for r in first]),
      "seed": np.array([int(r["seed"]) for r in first]),
      "accuracy": np.array([float(r["test_accuracy"]) for r in first]),
      "sharpness": np.array([float(r["sharpness"] or "nan") for r in first]),
      "forgetting": np.array([[float(x["forgetting"]) for x in r] for r in runs]),
      "task_information": np.array(
        [[float(x["task_information_change"]) for x in r] for r in runs]
      ),
    }
  return out


def why_no_tau(panel: dict[str, np.ndarray]) -> str:
  """Why Kendall's tau is undefined for a panel's runs, in words."""
  n = len(panel["accuracy"])
  if n < 2:
    return "1 run: a rank correlation needs at least 2 runs (and 4 to count as a result)"
  if len(set(panel["accuracy"].tolist())) == 1:
    return f"its {n} runs have the same test accuracy: nothing to rank"
  return f"its measures are the same on its {n} runs at every threshold: nothing to rank"


def write_csv(path: str, results: dict[str, dict[str, np.ndarray]], sizes: dict[str, int]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for panel, r in results.items():
      small = int(sizes[panel] < MIN_RUNS)
      for i, a in enumerate(forgetting.ADJUSTED_THRESHOLDS):
        values = [f"{r[k][i]:.6g}" for k in COLUMNS[4:]]
        writer.writerow([panel, f"{a:.2f}", sizes[panel], small] + values)


def plot(path: str, results: dict[str, dict[str, np.ndarray]], sizes: dict[str, int]) -> dict:
  """Draws the panels; returns {panel: (title, legend labels)} of what was drawn."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  x = forgetting.ADJUSTED_THRESHOLDS
  fig, axes = plt.subplots(
    1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False, sharey=True
  )
  for ax, (panel, r) in zip(axes[0], results.items()):
    small, no_tau = sizes[panel] < MIN_RUNS, r.get("no_tau", False)
    if small or no_tau:
      ax.set_facecolor("0.93")
      text = f"too few runs ({sizes[panel]} < {MIN_RUNS}):\nnot a result" if small else ""
      if no_tau:
        text += ("\n" if text else "") + "no Kendall τ:\nsee forgetting_runs.csv"
      ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="0.4",
        zorder=0,
      )
    for name, color, label in (
      ()
      if no_tau
      else (
        ("forgetting", "tab:green", "I(X;Ŷ|Y) − I(X;Ŷᵖ|Y)"),
        ("task_information", "tab:orange", "I(Ŷ;Y) − I(Ŷᵖ;Y)"),
      )
    ):
      tau, sig = r["tau_" + name], r["p_" + name] <= SIGNIFICANT
      ax.plot(x, tau, color=color, linestyle=":", linewidth=1)
      ax.plot(x, np.where(sig, tau, np.nan), color=color, linewidth=2, label=label)
    tau_s = r["tau_sharpness"][0]
    if np.isfinite(tau_s):  # measured (on >= 2 runs): a line, else none
      k = r["sharpness_runs"]
      ax.axhline(
        tau_s,
        color="tab:blue",
        linewidth=2 if r["p_sharpness"][0] <= SIGNIFICANT else 1,
        linestyle="-" if r["p_sharpness"][0] <= SIGNIFICANT else ":",
        label="sharpness" + ("" if k == sizes[panel] else f" ({k} of {sizes[panel]} runs)"),
      )
    beats = (r["tau_forgetting"] > abs(tau_s)) & (r["p_forgetting"] <= SIGNIFICANT)
    if np.isfinite(tau_s):
      ax.fill_between(
        x,
        abs(tau_s),
        r["tau_forgetting"],
        where=beats,
        facecolor="none",
        edgecolor="tab:green",
        hatch="//",
        linewidth=0,
      )
    ax.axhline(0.0, color="grey", linewidth=0.5)
    runs = reporting.plural(sizes[panel], "run")
    flags = (", too few" if small else "") + (", no τ" if no_tau else "")
    ax.set_title(f"{panel} ({runs}{flags})", fontsize=9)
    ax.set_xlabel("adjusted threshold")
    ax.set_ylim(-1.05, 1.05)
  axes[0][0].set_ylabel("Kendall's τ with test accuracy")
  for ax in axes[0]:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="lower left")
  drawn = {
    panel: (ax.get_title(), ax.get_legend_handles_labels()[1])
    for ax, panel in zip(axes[0], results)
  }
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def _fmt(v: float, spec: str = "+.2f") -> str:
  return "–" if not np.isfinite(v) else format(v, spec)


def _mean_sd(v: np.ndarray) -> tuple[float, float]:
  """Mean and sample sd (NaN where undefined: no values, or one for the sd)."""
  mean = float(np.mean(v)) if len(v) else np.nan
  return mean, float(np.std(v, ddof=1)) if len(v) > 1 else np.nan


def summary(groups: dict[str, dict[str, np.ndarray]], results: dict[str, dict]) -> str:
  """The markdown of figure2.md: each (panel, m)'s accuracy and sharpness over its seeds, and
  each panel's taus, Holm-adjusted over every panel's sharpness p and curves' "any threshold" p
  (the pool's analysis plan, results/science/PROTOCOL.md's amendment 3)."""
  lines = [
    "| panel | m | runs | test top-1 (%) mean | sd | sharpness mean | sd |",
    "|---|---|---|---|---|---|---|",
  ]
  for panel, a in groups.items():
    for m in sorted(set(a["m"].tolist())):
      acc, sharp = 100 * a["accuracy"][a["m"] == m], a["sharpness"][a["m"] == m]
      cells = [_fmt(v, ".2f") for v in (*_mean_sd(acc), *_mean_sd(sharp[np.isfinite(sharp)]))]
      lines.append(f"| {panel} | {m} | {len(acc)} | " + " | ".join(cells) + " |")
  family = [(k, "p_sharpness") for k in results] + [
    (k, f"p_any_{c}") for k in results for c in CURVES
  ]
  holm = dict(zip(family, paired.holm([results[k][name][0] for k, name in family])))
  lines += [
    "",
    "| panel | runs | τ sharpness [95% CI] | p | p Holm | measure | largest abs(τ) at adjusted "
    "threshold | τ there [95% CI] | p there | p any threshold | p Holm |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for panel, r in results.items():
    n = len(groups[panel]["accuracy"])
    sharp = (
      f"{_fmt(r['tau_sharpness'][0])} [{_fmt(r['lo_sharpness'][0])}, "
      f"{_fmt(r['hi_sharpness'][0])}] | {_fmt(r['p_sharpness'][0], '.2g')} "
      f"| {_fmt(holm[(panel, 'p_sharpness')], '.2g')}"
    )
    for c in CURVES:
      tau = np.abs(r[f"tau_{c}"])
      if not np.isfinite(tau).any():
        lines.append(f"| {panel} | {n} | {sharp} | {c} | – | – | – | – | – |")
        continue
      i = int(np.nanargmax(tau))
      lines.append(
        f"| {panel} | {n} | {sharp} | {c} | {forgetting.ADJUSTED_THRESHOLDS[i]:.2f} "
        f"| {_fmt(r[f'tau_{c}'][i])} [{_fmt(r[f'lo_{c}'][i])}, {_fmt(r[f'hi_{c}'][i])}] "
        f"| {_fmt(r[f'p_{c}'][i], '.2g')} | {_fmt(r[f'p_any_{c}'][0], '.2g')} "
        f"| {_fmt(holm[(panel, f'p_any_{c}')], '.2g')} |"
      )
  return "\n".join(lines) + "\n"


def figure2(
  workdirs: list[str], out: str, *, num_permutations: int = 10_000, seed: int = 0
) -> dict[str, dict]:
  """Figure 2 of finished runs: OUT/forgetting_runs.csv, then `figure2_of_panels`' files."""
  runs = pool.load_runs(workdirs)
  runs = [r for r in runs if r.config["sam"]["perturbation"] != "none"]
  if not runs:
    raise ValueError("figure 2 needs runs with a SAM-family perturbation")
  groups = {k: panel_arrays(v) for k, v in panels(runs).items()}
  os.makedirs(out, exist_ok=True)
  write_runs_csv(os.path.join(out, "forgetting_runs.csv"), groups)
  return figure2_of_panels(groups, out, num_permutations=num_permutations, seed=seed)


def figure2_of_panels(
  groups: dict[str, dict[str, np.ndarray]], out: str, *, num_permutations: int, seed: int
) -> dict[str, dict]:
  """OUT/forgetting.csv and OUT/figure2.png from the panels' arrays (run folders or
  `read_runs_csv`); returns each panel's correlations and what was drawn."""
  sizes = {k: len(v["accuracy"]) for k, v in groups.items()}
  results = {
    k: correlations(v, num_permutations=num_permutations, seed=seed) for k, v in groups.items()
  }
  runs_csv = os.path.join(out, "forgetting_runs.csv")
  for panel in results:
    if not any(np.isfinite(results[panel][f"tau_{c}"]).any() for c in CURVES):  # empty, greyed
      results[panel]["no_tau"] = True
      print(
        f"note: panel {panel!r} has no Kendall tau: {why_no_tau(groups[panel])}; drawn greyed, "
        f"the runs' measures are in {runs_csv}",
        file=sys.stderr,
      )
    elif sizes[panel] < MIN_RUNS:
      print(
        f"note: panel {panel!r} has {sizes[panel]} runs (< {MIN_RUNS}): drawn marked "
        "'too few runs', not a result",
        file=sys.stderr,
      )
  os.makedirs(out, exist_ok=True)
  write_csv(os.path.join(out, "forgetting.csv"), results, sizes)
  with open(os.path.join(out, "figure2.md"), "w") as f:
    f.write(summary(groups, results))
  drawn = plot(os.path.join(out, "figure2.png"), results, sizes)
  for panel, r in results.items():
    r["drawn"] = drawn[panel]
  return results
