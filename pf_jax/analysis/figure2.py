"""Figure 2: Kendall's tau of final accuracy with forgetting, task-information change and sharpness.

`python -m pf_jax.analysis forgetting --workdirs W1 W2 ... --out DIR` writes
- `DIR/forgetting.csv`: one row per (panel, adjusted threshold): tau and permutation p-value of
  accuracy with the run-averaged forgetting I(X;Y^|Y) - I(X;Y^p|Y), with the task-information
  change I(Y^;Y) - I(Y^p;Y), and (constant over thresholds) with sharpness;
- `DIR/figure2.png`: tau against adjusted threshold, one panel per perturbation type (runs are
  grouped by SAM framework and perturbation, so each panel is an m sweep, and by training
  dataset where the runs span several), solid lines where
  p <= 0.05 and dotted elsewhere, sharpness as a horizontal line, and a hatch where forgetting's
  correlation is significant and larger than the magnitude of sharpness's (our reading of "where
  forgetting correlates with generalization more strongly than flatness").

- `DIR/forgetting_runs.csv`: one row per (run, adjusted threshold): the run's test accuracy,
  sharpness, forgetting and task-information change, the numbers each tau ranks (written
  whatever the number of runs, so one run's analysis is there too).

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
from pf_jax.analysis import pool

SIGNIFICANT = 0.05
MIN_RUNS = 4  # fewer runs per panel: drawn marked "too few runs", not presented as a result
COLUMNS = (
  "panel",
  "adjusted_threshold",
  "runs",
  "too_few_runs",
  "tau_forgetting",
  "p_forgetting",
  "tau_task_information",
  "p_task_information",
  "tau_sharpness",
  "p_sharpness",
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


def correlations(
  runs: list[pool.Run], *, num_permutations: int, seed: int
) -> dict[str, np.ndarray]:
  """tau and p of accuracy with each measure at each adjusted threshold, for one panel."""
  accuracy = np.array([r.test_accuracy for r in runs])
  measures = [pool.run_forgetting(r) for r in runs]
  out = {}
  for name, index in (("forgetting", 0), ("task_information", 1)):
    values = np.stack([m[index] for m in measures])  # [runs, adjusted thresholds]
    out["tau_" + name] = np.array([correlation.kendall_tau(accuracy, v) for v in values.T])
    out["p_" + name] = np.array(
      [
        correlation.permutation_pvalue(accuracy, v, num_permutations=num_permutations, seed=seed)
        for v in values.T
      ]
    )
  sharp = np.array([np.nan if r.sharpness is None else r.sharpness for r in runs])
  known = ~np.isnan(sharp)
  tau_s = correlation.kendall_tau(accuracy[known], sharp[known]) if known.sum() > 1 else np.nan
  p_s = (
    correlation.permutation_pvalue(
      accuracy[known], sharp[known], num_permutations=num_permutations, seed=seed
    )
    if known.sum() > 1
    else np.nan
  )
  out["tau_sharpness"] = np.full(forgetting.NUM_ADJUSTED, tau_s)
  out["p_sharpness"] = np.full(forgetting.NUM_ADJUSTED, p_s)
  out["sharpness_runs"] = int(known.sum())
  return out


RUN_COLUMNS = (
  "panel",
  "workdir",
  "test_accuracy",
  "sharpness",
  "adjusted_threshold",
  "forgetting",
  "task_information_change",
)


def write_runs_csv(path: str, groups: dict[str, list[pool.Run]]) -> None:
  """The per-run table: each run's measures at each adjusted threshold."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(RUN_COLUMNS)
    for panel, runs in groups.items():
      for run in runs:
        forget, task = pool.run_forgetting(run)
        sharp = "" if run.sharpness is None else f"{run.sharpness:.6g}"
        for i, a in enumerate(forgetting.ADJUSTED_THRESHOLDS):
          row = [panel, run.workdir, f"{run.test_accuracy:.6g}", sharp, f"{a:.2f}"]
          writer.writerow(row + [f"{forget[i]:.6g}", f"{task[i]:.6g}"])


def why_no_tau(runs: list[pool.Run]) -> str:
  """Why Kendall's tau is undefined for a panel's runs, in words."""
  if len(runs) < 2:
    return "1 run: a rank correlation needs at least 2 runs (and 4 to count as a result)"
  if len({r.test_accuracy for r in runs}) == 1:
    return f"its {len(runs)} runs have the same test accuracy: nothing to rank"
  return f"its measures are the same on its {len(runs)} runs at every threshold: nothing to rank"


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


def figure2(workdirs: list[str], out: str, *, num_permutations: int = 10_000, seed: int = 0):
  runs = pool.load_runs(workdirs)
  runs = [r for r in runs if r.config["sam"]["perturbation"] != "none"]
  if not runs:
    raise ValueError("figure 2 needs runs with a SAM-family perturbation")
  groups = panels(runs)
  sizes = {k: len(v) for k, v in groups.items()}
  results = {
    k: correlations(v, num_permutations=num_permutations, seed=seed) for k, v in groups.items()
  }
  taus = ("tau_forgetting", "tau_task_information")
  runs_csv = os.path.join(out, "forgetting_runs.csv")
  for panel in results:
    if not any(np.isfinite(results[panel][k]).any() for k in taus):  # an empty, greyed panel
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
  write_runs_csv(runs_csv, groups)
  write_csv(os.path.join(out, "forgetting.csv"), results, sizes)
  drawn = plot(os.path.join(out, "figure2.png"), results, sizes)
  for panel, r in results.items():
    r["drawn"] = drawn[panel]
  return results
