"""PNG plots beside a results table: accuracy per setting with error bars, training curves.

`python -m pf_jax.analysis report --plots` writes, next to results.md:
  accuracy.png  one panel per eval set (e.g. ID and OOD): mean top-1 (%) of every row of the
                table, error bars = the table's standard deviation over seeds; bars start at a
                baseline stated on the axis (a multiple of 10 below the lowest bar);
  curves.png    training loss and first-eval-set top-1 against the step, mean over each row's
                seeds (read from the runs' TensorBoard event files with TensorBoard's reader).
Every row has its own label: method, m, OBF's lambda and gamma, the training dataset where rows
differ in it, then the model where needed.
"""

import collections
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pf_jax.analysis import pool  # noqa: E402


def row_label(row) -> str:
  """Method of a table row: ALGO, PERTURB with OBF's lambda/gamma (or alpha), and m, e.g.
  'SAM OBF lambda=0.1 gamma=1 m=8' or 'ADAMW'."""
  if row["perturb"].startswith("NONE"):
    return row["algo"]
  return f"{row['algo']} {row['perturb']} m={row['m']}"


def row_labels(rows) -> list[str]:
  """`row_label` of every row, made unique: the training dataset added where rows differ in it,
  the model where labels repeat, then '#i'."""
  datasets = [r["dataset"] for r in rows]
  labels = [row_label(r) + pool.dataset_tag(r["dataset"], datasets) for r in rows]
  counts = collections.Counter(labels)
  labels = [f"{l} {r['model']}" if counts[l] > 1 else l for l, r in zip(labels, rows)]
  counts, seen = collections.Counter(labels), collections.Counter()
  out = []
  for l in labels:
    seen[l] += 1
    out.append(f"{l} #{seen[l]}" if counts[l] > 1 else l)
  return out


def baseline(lowest: float) -> float:
  """Where bars start: the multiple of 10 (%) below `lowest`, at least 0."""
  return max(0.0, 10.0 * np.floor(lowest / 10.0 - 1e-9)) if np.isfinite(lowest) else 0.0


def accuracy_plot(rows, metrics, path: str) -> None:
  """Bars of mean top-1 with std error bars from a stated baseline, one panel per eval metric."""
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
  labels = row_labels(rows)
  x = np.arange(len(rows))
  for ax, k in zip(axes[0], metrics):
    means = np.array([r[k][0] for r in rows])
    stds = np.nan_to_num(np.array([r[k][1] for r in rows]))
    finite = np.isfinite(means)
    base = baseline(float(np.min(means[finite] - stds[finite]))) if finite.any() else 0.0
    ax.bar(x, means - base, bottom=base, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
    top = float(np.max(means[finite] + stds[finite])) if finite.any() else 100.0
    ax.set_ylim(base, min(100.0, top + 1.0) if top < 100 else 100.0)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_title(k[len("eval/") :].replace("/top1", ""))
    ax.set_ylabel(f"top-1 (%), mean ± std over seeds; bars start at {base:g}%")
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def scalar_history(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every scalar in a workdir's event files, sorted by step."""
  # TensorBoard's own reader: no TensorFlow, no deprecation notices on stderr.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  out: dict[str, dict[int, float]] = {}
  for f in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in event_file_loader.LegacyEventFileLoader(f).Load():
      for v in event.summary.value:
        if v.HasField("tensor") and not v.tensor.string_val:
          array = np.asarray(tensor_util.make_ndarray(v.tensor))
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
