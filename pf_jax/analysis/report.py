"""Results tables in the layout of Tables 1 and B.1: `python -m pf_jax.analysis report`.

One row per setting (runs that differ only in seed, `pool.NOT_SETTING`): model, training
dataset, ALGO, PERTURB, m, top-1 (%) on every eval set of its config and sharpness, as mean ±
standard deviation (ddof = 1, like "standard deviations ... with three trials") over its runs.
A workdir listed twice counts once; a sharpness measured before its run's last step is not used;
both are said in notes below the table.
Writes `DIR/results.md` and `DIR/results.csv` (numeric means and stds); `--plots` also
`DIR/accuracy.png` and `DIR/curves.png` (pf_jax/analysis/plots.py).
"""

import csv
import os

import numpy as np

from pf_jax.analysis import pool


def _stats(values: list[float]):
  values = np.asarray([v for v in values if v is not None], np.float64)
  if not values.size:
    return np.nan, np.nan
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else np.nan


def _fmt(mean: float, std: float, digits: int) -> str:
  if np.isnan(mean):
    return "—"
  return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _sharpness_decimals(value: float) -> int:
  """1 decimal like the paper's 165.6 for values >= 10, else 3 significant digits."""
  if not np.isfinite(value) or value == 0:
    return 1
  return max(1, 2 - int(np.floor(np.log10(abs(value)))))


def table(runs: list[pool.Run]):
  """(rows, eval metric names): one row per setting, values as (mean, std)."""
  groups: dict[str, list[pool.Run]] = {}
  for run in runs:
    groups.setdefault(run.setting, []).append(run)
  # Top-1 columns (in %); the eval losses stay in results.json and the events.
  metrics = sorted(
    {k for r in runs for k in r.results if k.startswith("eval/") and k.endswith("top1")}
  )
  rows = []
  for members in groups.values():
    first = members[0]
    row = {
      "model": first.model,
      "dataset": first.dataset,
      "algo": first.algo,
      "perturb": first.perturbation,
      "m": "" if first.m is None else first.m,
      "runs": len(members),
      "seeds": " ".join(str(r.config["seed"]) for r in members),
      "members": members,
    }
    for k in metrics:
      row[k] = _stats([100 * r.results[k] if k in r.results else None for r in members])
    row["sharpness"] = _stats([r.sharpness for r in members])
    rows.append(row)
  rows.sort(
    key=lambda r: (r["model"], r["dataset"], r["algo"], r["perturb"], r["m"] if r["m"] != "" else 0)
  )
  return rows, metrics


def report(workdirs: list[str], out: str, *, plots: bool = False) -> str:
  """Writes the table (and with `plots`, accuracy.png and curves.png, see plots.py); returns it."""
  notes = []
  rows, metrics = table(pool.load_runs(workdirs, notes))
  os.makedirs(out, exist_ok=True)
  names = [k[len("eval/") :].replace("/top1", "").replace("/real_top1", " ReaL") for k in metrics]
  lines = [
    "| MODEL | DATASET | ALGO | PERTURB | m | "
    + " | ".join(n.upper() for n in names)
    + " | SHARPNESS | RUNS |",
    "|" + "---|" * (len(metrics) + 7),
  ]
  for r in rows:
    cells = [r["model"], r["dataset"], r["algo"], r["perturb"], str(r["m"])]
    cells += [_fmt(*r[k], 2) for k in metrics]
    cells += [_fmt(*r["sharpness"], _sharpness_decimals(r["sharpness"][0])), str(r["runs"])]
    lines.append("| " + " | ".join(cells) + " |")
  lines += [""] + [f"Note: {n}" for n in notes] if notes else []
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      ["model", "dataset", "algo", "perturb", "m", "runs", "seeds"]
      + [f"{k}/{s}" for k in metrics + ["sharpness"] for s in ("mean", "std")]
    )
    for r in rows:
      writer.writerow(
        [r[k] for k in ("model", "dataset", "algo", "perturb", "m", "runs", "seeds")]
        + [f"{v:.6g}" for k in metrics + ["sharpness"] for v in r[k]]
      )
  if plots:
    from pf_jax.analysis import plots as plots_lib  # pylint: disable=g-import-not-at-top

    plots_lib.accuracy_plot(rows, metrics, os.path.join(out, "accuracy.png"))
    groups = list(zip(plots_lib.row_labels(rows), [r["members"] for r in rows]))
    plots_lib.training_curves(groups, os.path.join(out, "curves.png"))
  return text
