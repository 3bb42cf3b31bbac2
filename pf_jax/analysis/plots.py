"""PNG plots beside a results table: accuracy per experiment with error bars, training curves.

`python -m pf_jax.analysis report --plots` writes, next to results.md:
  accuracy.png  one panel per eval set (e.g. ID and OOD): mean top-1 (%) of every row of the
                table, error bars = the table's standard deviation over seeds;
  curves.png    training loss and first-eval-set top-1 against the step, mean over each row's
                seeds (read from the runs' TensorBoard event files).
"""

import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pf_jax.analysis import pool  # noqa: E402


def row_label(row) -> str:
  """Short method name of a table row, e.g. 'SAM OBF' or 'ADAMW'."""
  perturb = row["perturb"].split(" ")[0]
  return row["algo"] if perturb == "NONE" else f"{row['algo']} {perturb}"


def accuracy_plot(rows, metrics, path: str) -> None:
  """Bars of mean top-1 with std error bars, one panel per eval metric."""
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
  labels = [row_label(r) for r in rows]
  x = np.arange(len(rows))
  for ax, k in zip(axes[0], metrics):
    means = np.array([r[k][0] for r in rows])
    stds = np.nan_to_num(np.array([r[k][1] for r in rows]))
    ax.bar(x, means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
    finite = means[np.isfinite(means)]
    if finite.size:
      lo = max(0.0, float(np.min(finite - stds[np.isfinite(means)])) - 2.0)
      ax.set_ylim(lo, min(100.0, float(np.max(finite + stds[np.isfinite(means)])) + 1.0))
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_title(k[len("eval/") :].replace("/top1", ""))
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def scalar_history(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every scalar in a workdir's event files, sorted by step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (event files: only here)

  out: dict[str, dict[int, float]] = {}
  for f in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(f):
      for v in event.summary.value:
        if v.HasField("tensor") and not v.tensor.string_val:
          array = np.asarray(tf.make_ndarray(v.tensor))
          if array.size != 1:  # hyperparameters and other non-scalars
            continue
          value = float(array.reshape(-1)[0])
        elif v.HasField("simple_value"):
          value = float(v.simple_value)
        else:
          continue
        out.setdefault(v.tag, {})[int(event.step)] = value
  return {tag: sorted(points.items()) for tag, points in out.items()}


def _mean_curve(histories, tag):
  """Steps present in every run and the mean value there."""
  series = [dict(h.get(tag, [])) for h in histories]
  steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
  return steps, [float(np.mean([s[t] for s in series])) for t in steps]


def training_curves(groups: list[tuple[str, list[pool.Run]]], path: str) -> None:
  """Training loss and first-eval-set top-1 against the step, mean over each group's runs."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.5))
  for label, runs in groups:
    histories = [scalar_history(r.workdir) for r in runs]
    steps, loss = _mean_curve(histories, "train/loss")
    line = ax_loss.plot(steps, loss, label=label)[0]
    tag = f"eval/{runs[0].config['eval_datasets'][0]}/top1"
    steps, acc = _mean_curve(histories, tag)
    ax_acc.plot(steps, 100 * np.asarray(acc), color=line.get_color(), marker=".", label=label)
  ax_loss.set(xlabel="step", ylabel="training loss (mean over seeds)", yscale="log")
  ax_acc.set(xlabel="step", ylabel="top-1 (%) on the first eval set (mean over seeds)")
  ax_acc.legend(fontsize=7)
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
