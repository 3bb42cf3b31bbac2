"""The pre-registered SAM dose-response and OBF-vs-STEEP tables, from committed per-seed rows only.

  python -m pf_jax.analysis.science results/science   # rewrites results/science/{tables.md,runs.csv}

reads `runs.jsonl` (one JSON object per finished run, appended by launch/science.py: block,
method, rho, seed, every final metric, sharpness, times) and `search.jsonl` (the validation-only
search runs), rewrites `runs.csv` (the same rows, flat) and writes `tables.md`, the tables REPORT.md embeds verbatim (tests/test_science.py
checks that they are equal). Nothing here trains or imports JAX.

The protocol (results/science/PROTOCOL.md, committed before the first run) fixes: the blocks, the
dose range, 20 paired seeds per contrast, the primary metric of each block, the family of
confirmatory contrasts (FAMILY) and its Holm adjustment (contrasts without data count as p = 1),
and the TOST margins (MARGIN).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys

import numpy as np

from pf_jax.analysis import paired

DOSES = (0.03, 0.1, 0.3, 0.6, 1.0)  # SAM's radius, fixed per arm (no search)
SEEDS = 20  # paired seeds per contrast (the confirmatory n)
ALPHA = 0.05  # Holm-adjusted level of every decision (t-test and TOST)
# An arm whose mean primary top-1 is below this (points; twice chance for 10 classes) did not
# train: two such arms agreeing is never read as an equivalence (PROTOCOL.md, amendment 2).
TRAINED_TOP1 = 20.0


@dataclasses.dataclass(frozen=True)
class Block:
  """One setting: what trains, what is evaluated, and the metric that decides."""

  name: str
  dataset: str  # training dataset (pf_jax/dataset_catalog.py)
  eval_datasets: tuple[str, ...]
  primary: str  # the deciding eval set
  lr_max: float
  margin: float  # TOST margin (points of top-1), fixed in advance
  contrasts: str  # "sam" (SAM − AdamW at each dose) or "obf" (OBF − STEEP at each dose)


SPURIOUS_EVALS = ("spurious_digits", "spurious_digits_ood", "spurious_digits_ood_all")
# In the order the runner trains them (most informative first).
BLOCKS = (
  Block(
    "noise50", "noisy_digits_sym50", ("noisy_digits_sym50",), "noisy_digits_sym50", 1e-2, 1.0, "sam"
  ),
  Block(
    "noise50_obf",
    "noisy_digits_sym50",
    ("noisy_digits_sym50",),
    "noisy_digits_sym50",
    1e-2,
    1.0,
    "obf",
  ),
  Block(
    "noise25", "noisy_digits_sym25", ("noisy_digits_sym25",), "noisy_digits_sym25", 1e-2, 1.0, "sam"
  ),
  Block("clean", "digits", ("digits",), "digits", 1e-2, 1.0, "sam"),
  Block("spurious", "spurious_digits", SPURIOUS_EVALS, "spurious_digits_ood_all", 3e-3, 0.5, "sam"),
)
BLOCK = {b.name: b for b in BLOCKS}
ORDER_INDEX = {b.name: i for i, b in enumerate(BLOCKS)}
# The searched optimum (validation carve-out of noise50, seeds SEARCH_SEEDS, mean val top-1;
# ties to the smaller rho): STEEP and OBF each pick their own rho from DOSES.
SEARCH_BLOCK = "noise50"
SEARCH_SEEDS = (0, 1, 2)
OBF_FIELDS = {"obf_lambda": 0.1, "obf_gamma": 1.0}  # lambda = 1/C, gamma = 1 (the paper's)


def arms(block: Block) -> list[tuple[str, float]]:
  """(method, rho) of every arm of a block; rho 0 for AdamW."""
  if block.contrasts == "sam":
    return [("adamw", 0.0)] + [("sam_steep", r) for r in DOSES]
  return [("sam_obf", r) for r in DOSES]  # its STEEP partners are the "noise50" block's


def family() -> list[tuple[str, str, str, float]]:
  """The confirmatory contrasts: (label, block of other, base (block, method), rho)."""
  out = []
  for b in BLOCKS:
    for r in DOSES:
      if b.contrasts == "sam":
        out.append((f"{b.name}: SAM(ρ={r:g}) − AdamW", b.name, "sam", r))
      else:
        out.append((f"{b.name.split('_')[0]}: OBF(ρ={r:g}) − STEEP(ρ={r:g})", b.name, "obf", r))
  out.append((f"{SEARCH_BLOCK}: OBF − STEEP at each one's searched ρ", SEARCH_BLOCK, "searched", 0))
  return out


def read_rows(folder: str, name: str = "runs.jsonl") -> list[dict]:
  """Every row of FOLDER/NAME; a later row with the same key replaces an earlier one."""
  path = os.path.join(folder, name)
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          rows[(r["block"], r["method"], r["rho"], r["seed"])] = r
  return list(rows.values())


def top1(row: dict, dataset: str) -> float | None:
  v = row["results"].get(f"eval/{dataset}/top1")
  return None if v is None else 100 * v


def _by_seed(rows, block, method, rho) -> dict[int, dict]:
  return {
    r["seed"]: r
    for r in rows
    if r["block"] == block and r["method"] == method and math.isclose(r["rho"], rho)
  }


def search_winners(search_rows) -> dict[str, float | None]:
  """{method: rho with the highest mean validation top-1 over SEARCH_SEEDS} (None: incomplete)."""
  val = f"{BLOCK[SEARCH_BLOCK].dataset}_val"
  out = {}
  for method in ("sam_steep", "sam_obf"):
    scores = []
    for r in DOSES:
      got = _by_seed(search_rows, SEARCH_BLOCK, method, r)
      if any(s not in got for s in SEARCH_SEEDS):
        out[method] = None
        break
      scores.append((np.mean([top1(got[s], val) for s in SEARCH_SEEDS]), -r, r))
    else:
      out[method] = max(scores)[2]  # ties to the smaller rho
  return out


def pairs(rows, search_rows, label_kind, block_name, rho, metric):
  """(seeds, other − base in points, sharpness pairs, (base, other) mean top-1) of one contrast."""
  if label_kind == "sam":
    base, other = (
      _by_seed(rows, block_name, "adamw", 0.0),
      _by_seed(rows, block_name, "sam_steep", rho),
    )
  elif label_kind == "obf":
    base = _by_seed(rows, "noise50", "sam_steep", rho)
    other = _by_seed(rows, block_name, "sam_obf", rho)
  else:
    w = search_winners(search_rows)
    if w["sam_steep"] is None or w["sam_obf"] is None:
      return [], np.zeros(0), [], (math.nan, math.nan)
    base = _by_seed(rows, "noise50", "sam_steep", w["sam_steep"])
    other = _by_seed(rows, "noise50_obf", "sam_obf", w["sam_obf"])
  seeds = sorted(set(base) & set(other))
  a = np.array([top1(base[s], metric) for s in seeds])
  b = np.array([top1(other[s], metric) for s in seeds])
  sharp = [(base[s].get("sharpness"), other[s].get("sharpness")) for s in seeds]
  means = (float(a.mean()), float(b.mean())) if seeds else (math.nan, math.nan)
  return seeds, b - a, sharp, means


def decision(rec: dict) -> str:
  """What a contrast's record decides (PROTOCOL.md's rules; amendment 2 for arms at chance)."""
  if max(rec["arm_means"]) < TRAINED_TOP1:
    return f"both arms < {TRAINED_TOP1:g}%: not an equivalence"
  within = f"within ±{rec['margin']:g}"
  if rec["p_holm"] < ALPHA:  # a difference, and possibly one smaller than the margin
    sign = "other > base" if rec["mean"] > 0 else "other < base"
    return f"{sign}, {within}" if rec["tost_holm"] < ALPHA else sign
  return f"equivalent ({within})" if rec["tost_holm"] < ALPHA else "undecided"


def _fmt_p(p: float) -> str:
  return "–" if p is None or math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _ci(lo, hi) -> str:
  return "–" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"


def confirmatory(rows, search_rows) -> tuple[list[str], list[dict]]:
  """The family's table (Holm over every pre-registered contrast; missing ones count as p = 1)."""
  records = []
  for label, block_name, kind, rho in family():
    metric = BLOCK[block_name].primary
    seeds, d, sharp, means = pairs(rows, search_rows, kind, block_name, rho, metric)
    rec = {"label": label, "metric": metric, "n": len(d), "margin": BLOCK[block_name].margin}
    rec["arm_means"] = means
    if len(d) >= 2:
      s, e = paired.summarize(d), paired.tost(d, BLOCK[block_name].margin)
      rec.update(mean=s.mean, lo=s.lo, hi=s.hi, p=s.p_t, tost=e.p, lo90=e.lo90, hi90=e.hi90)
      sd = [b - a for a, b in sharp if a is not None and b is not None]
      if len(sd) >= 2:
        ss = paired.summarize(sd)
        rec.update(sharp_mean=ss.mean, sharp_lo=ss.lo, sharp_hi=ss.hi)
    records.append(rec)
  p = [r.get("p", 1.0) if not math.isnan(r.get("p", 1.0)) else 1.0 for r in records]
  t = [r.get("tost", 1.0) if not math.isnan(r.get("tost", 1.0)) else 1.0 for r in records]
  for r, hp, ht in zip(records, paired.holm(p), paired.holm(t)):
    r["p_holm"], r["tost_holm"] = hp, ht
  lines = [
    "| contrast | eval set | seeds | mean diff (points) | 95% CI | p (t) | p Holm | TOST margin "
    "| 90% CI | TOST p Holm | sharpness diff [95% CI] | decision | status |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in records:
    if r["n"] < 2:
      lines.append(
        f"| {r['label']} | {r['metric']} | {r['n']} | – | – | – | – | ±{r['margin']:g} | – | – "
        "| – | – | pending |"
      )
      continue
    status = "complete" if r["n"] >= SEEDS else f"interim ({r['n']}/{SEEDS} seeds)"
    sharp = (
      f"{r['sharp_mean']:+.2f} [{r['sharp_lo']:+.2f}, {r['sharp_hi']:+.2f}]"
      if "sharp_mean" in r
      else "–"
    )
    lines.append(
      f"| {r['label']} | {r['metric']} | {r['n']} | {r['mean']:+.2f} | {_ci(r['lo'], r['hi'])} "
      f"| {_fmt_p(r['p'])} | {_fmt_p(r['p_holm'])} | ±{r['margin']:g} "
      f"| {_ci(r['lo90'], r['hi90'])} | {_fmt_p(r['tost_holm'])} | {sharp} | {decision(r)} "
      f"| {status} |"
    )
  return lines, records


def arm_table(rows) -> list[str]:
  """Every arm's mean top-1 on each eval set and its mean sharpness, with 95% t intervals."""
  lines = [
    "| block | method | ρ | eval set | seeds | mean top-1 (%) | 95% CI | sharpness | 95% CI |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for b in BLOCKS:
    for method, rho in arms(b):
      got = _by_seed(rows, b.name, method, rho)
      if not got:
        continue
      sharp = [r["sharpness"] for r in got.values() if r.get("sharpness") is not None]
      for ds in b.eval_datasets:
        acc = [top1(r, ds) for r in got.values() if top1(r, ds) is not None]
        s = paired.summarize(acc)
        h = paired.summarize(sharp) if sharp else None
        sh = f"{h.mean:.2f} | {_ci(h.lo, h.hi).replace('+', '')}" if h else "– | –"
        lines.append(
          f"| {b.name} | {method} | {rho:g} | {ds} | {s.n} | {s.mean:.2f} "
          f"| {_ci(s.lo, s.hi).replace('+', '')} | {sh} |"
        )
  return lines


def secondary(rows) -> list[str]:
  """Exploratory: SAM − AdamW on the spurious block's other eval sets (not in the family)."""
  lines = ["| contrast | eval set | seeds | mean diff | 95% CI | p (t, unadjusted) |"]
  lines.append("|---|---|---|---|---|---|")
  b = BLOCK["spurious"]
  for r in DOSES:
    for ds in b.eval_datasets:
      if ds == b.primary:
        continue
      _, d, _, _ = pairs(rows, [], "sam", b.name, r, ds)
      if len(d) >= 2:
        s = paired.summarize(d)
        lines.append(
          f"| spurious: SAM(ρ={r:g}) − AdamW | {ds} | {s.n} | {s.mean:+.2f} "
          f"| {_ci(s.lo, s.hi)} | {_fmt_p(s.p_t)} |"
        )
  return lines if len(lines) > 2 else []


def search_table(search_rows) -> list[str]:
  val = f"{BLOCK[SEARCH_BLOCK].dataset}_val"
  lines = ["| method | ρ | seeds | mean val top-1 (%) | per seed |", "|---|---|---|---|---|"]
  for method in ("sam_steep", "sam_obf"):
    for r in DOSES:
      got = _by_seed(search_rows, SEARCH_BLOCK, method, r)
      if got:
        v = [top1(got[s], val) for s in sorted(got)]
        lines.append(
          f"| {method} | {r:g} | {len(v)} | {np.mean(v):.2f} | "
          + " / ".join(f"{x:.2f}" for x in v)
          + " |"
        )
  w = search_winners(search_rows)
  lines.append("")
  lines.append(
    "Winners: " + ", ".join(f"{m} ρ = {'pending' if v is None else f'{v:g}'}" for m, v in w.items())
  )
  return lines if len(lines) > 4 else ["No search run has finished yet (pending)."]


def report(folder: str) -> str:
  """The markdown of every table, from FOLDER's rows alone."""
  rows, search_rows = read_rows(folder), read_rows(folder, "search.jsonl")
  fam_lines, _ = confirmatory(rows, search_rows)
  cpu = sum(r.get("train_cpu_s", 0) + r.get("sharpness_cpu_s", 0) for r in rows + search_rows)
  out = [
    f"Rows: {len(rows)} runs, {len(search_rows)} search runs; {cpu / 3600:.2f} CPU-hours of "
    "training and sharpness in all (the runner's own CPU seconds per run).",
    "",
    "**Confirmatory family** (pre-registered; Holm over all "
    f"{len(family())} contrasts, a contrast without data counted as p = 1; other − base in "
    f"points of top-1; TOST p Holm < {ALPHA:g} shows |difference| < margin; sharpness diff: "
    "other − base, of the largest-magnitude Hessian eigenvalue of the training loss, which is "
    f"negative where the dominant curvature is negative; decision: p Holm < {ALPHA:g} (other > "
    f"or < base), else TOST p Holm < {ALPHA:g} (equivalent), else undecided, and never "
    f"equivalent where both arms' mean top-1 is below {TRAINED_TOP1:g}% (amendment 2)):",
    "",
    *fam_lines,
    "",
    "**Every arm** (mean over seeds, 95% t interval; the noisy blocks' eval set is the clean"
    " test split):",
    "",
    *arm_table(rows),
    "",
  ]
  sec = secondary(rows)
  if sec:
    out += ["**Exploratory** (spurious block, eval sets other than the primary one):", "", *sec, ""]
  out += ["**Search** (noise50, validation carve-out only):", "", *search_table(search_rows), ""]
  return "\n".join(out)


def write_csv(folder: str) -> None:
  """FOLDER/runs.csv: one flat row per run of runs.jsonl (every metric a column)."""
  rows = read_rows(folder)
  if not rows:
    return
  metrics = sorted({k for r in rows for k in r["results"]})
  head = ["block", "method", "rho", "seed", "dataset", "lr_max", "obf_lambda", "obf_gamma", "m"]
  tail = ["sharpness", "train_s", "train_cpu_s", "sharpness_s", "sharpness_cpu_s", "commit"]
  with open(os.path.join(folder, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(head + metrics + tail)
    for r in sorted(
      rows, key=lambda r: (ORDER_INDEX[r["block"]], r["method"], r["rho"], r["seed"])
    ):
      c, sam = r["config"], r["method"] != "adamw"
      w.writerow(
        [r["block"], r["method"], r["rho"], r["seed"], c.get("dataset", ""), c.get("lr_max", "")]
        + [c.get("sam.obf_lambda", ""), c.get("sam.obf_gamma", ""), 32 if sam else ""]
        + [r["results"].get(k, "") for k in metrics]
        + [r.get(k, "") for k in tail]
      )


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or not os.path.isdir(argv[0]):
    print(
      "usage: python -m pf_jax.analysis.science RESULTS_DIR (a folder holding runs.jsonl)",
      file=sys.stderr,
    )
    return 2
  text = report(argv[0])
  write_csv(argv[0])
  with open(os.path.join(argv[0], "tables.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
