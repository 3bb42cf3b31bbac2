"""The issue-29 tables (pf_jax/analysis/science.py) against hand-computed values, and REPORT.md's
embedded tables against what the regeneration command produces from the committed rows."""

import json
import math
import os

import numpy as np
import pytest

from pf_jax.analysis import science

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- science tables: begin -->", "<!-- science tables: end -->"


def _row(block, method, rho, seed, top1, sharpness, metric="noisy_digits_sym50"):
  return {
    "block": block,
    "method": method,
    "rho": rho,
    "seed": seed,
    "config": {},
    "results": {f"eval/{metric}/top1": top1},
    "sharpness": sharpness,
    "train_cpu_s": 10.0,
    "sharpness_cpu_s": 5.0,
  }


@pytest.fixture
def folder(tmp_path):
  rows = []
  for s, (a, b) in enumerate([(0.90, 0.92), (0.91, 0.92), (0.92, 0.95)]):
    rows.append(_row("noise50", "adamw", 0.0, s, a, 10.0 + s))
    rows.append(_row("noise50", "sam_steep", 0.1, s, b, 6.0 + 2 * s))
  rows.append(_row("noise50", "adamw", 0.0, 0, 0.90, 10.0))  # a repeated key: the last one wins
  with open(tmp_path / "runs.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(tmp_path)


def test_family_row_by_hand(folder):
  lines, records = science.confirmatory(science.read_rows(folder), [])
  assert len(records) == 26 == len(science.family())
  r = next(x for x in records if x["label"] == "noise50: SAM(ρ=0.1) − AdamW")
  # Differences 2, 1, 3 points: mean 2, sd 1, 95% CI 2 ± t_{.975,2} / sqrt(3) = 2 ± 2.4841.
  assert r["n"] == 3 and r["mean"] == pytest.approx(2.0)
  assert (r["lo"], r["hi"]) == (
    pytest.approx(2 - 2.4841, abs=1e-4),
    pytest.approx(4.4841, abs=1e-4),
  )
  # t = 2 sqrt(3) with 2 df: two-sided p = 1 - t / sqrt(2 + t^2) (closed form).
  t = 2 * math.sqrt(3)
  assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
  # Holm over 26, the other 25 counted as p = 1: 26 p capped at 1.
  assert r["p_holm"] == pytest.approx(min(1.0, 26 * r["p"]))
  # TOST, margin 1: the upper test binds, t = (2 - 1) sqrt(3) = 1.732 with 2 df, p = F(1.732).
  tu = math.sqrt(3)
  assert r["tost"] == pytest.approx(0.5 + tu / (2 * math.sqrt(2 + tu * tu)), rel=1e-9)
  # Sharpness SAM − AdamW per seed: -4, -3, -2.
  assert r["sharp_mean"] == pytest.approx(-3.0)
  row = next(x for x in lines if x.startswith("| noise50: SAM(ρ=0.1) − AdamW"))
  assert "| 3 | +2.00 | [-0.48, +4.48] |" in row and "interim (3/20 seeds)" in row
  assert row.endswith("| undecided | interim (3/20 seeds) |")  # Holm p 1, TOST Holm p 1
  pending = next(x for x in lines if x.startswith("| clean: SAM(ρ=1) − AdamW"))
  assert pending.endswith("| pending |")


def _decide(base, other, block="noise50", rho=1.0):
  rows = [_row(block, "adamw", 0.0, s, a, None) for s, a in enumerate(base)]
  rows += [_row(block, "sam_steep", rho, s, b, None) for s, b in enumerate(other)]
  _, records = science.confirmatory(rows, [])
  r = next(x for x in records if x["label"] == f"{block}: SAM(ρ={rho:g}) − AdamW")
  return r, science.decision(r)


def test_decisions():
  n = science.SEEDS
  wobble = [0.002 * (-1) ** s for s in range(n)]  # paired differences of +-0.2 points, mean 0
  # Both arms at one class (~10%): TOST alone would call them equivalent, amendment 2 does not.
  r, d = _decide([0.10 + w for w in wobble], [0.10] * n)
  assert r["tost_holm"] < 0.05 and d == "both arms < 20%: not an equivalence"
  # The same differences between trained arms: equivalent within the 1-point margin.
  assert _decide([0.90 + w for w in wobble], [0.90] * n)[1] == "equivalent (within ±1)"
  # A difference of 0.3 points that is significant and inside the margin: both said.
  assert _decide([0.90 + w for w in wobble], [0.903] * n)[1] == "other > base, within ±1"
  # One arm at chance, the other trained: the difference stands.
  assert _decide([0.85 + 0.001 * s for s in range(n)], [0.10] * n)[1] == "other < base"
  assert _decide([0.85] * n, [0.87 + 0.001 * s for s in range(n)])[1] == "other > base"
  # Neither: a noisy difference.
  assert _decide([0.85] * n, [0.85 + 0.05 * (-1) ** s for s in range(n)])[1] == "undecided"


def test_arm_table_and_report(folder):
  text = science.report(folder)
  # AdamW 90, 91, 92: mean 91, 95% CI 91 ± 4.3027 * 1 / sqrt(3) = 91 ± 2.48; sharpness 10, 11, 12.
  assert "| noise50 | adamw | 0 | noisy_digits_sym50 | 3 | 91.00 | [88.52, 93.48] | 11.00 |" in text
  assert "Rows: 6 runs, 0 search runs; 0.03 CPU-hours" in text  # 6 runs x 15 CPU-s = 90 s


def test_search_winners_tie_to_smaller_rho():
  rows = []
  for m in ("sam_steep", "sam_obf"):
    for r in science.DOSES:
      for s in science.SEARCH_SEEDS:
        acc = 0.9 if (m, r) in {("sam_steep", 0.1), ("sam_steep", 0.3), ("sam_obf", 0.6)} else 0.8
        rows.append(_row("noise50", m, r, s, acc, None, "noisy_digits_sym50_val"))
  assert science.search_winners(rows) == {"sam_steep": 0.1, "sam_obf": 0.6}
  assert science.search_winners(rows[:-1])["sam_obf"] is None  # a missing seed: pending


def test_report_tables_are_what_the_committed_rows_give():
  """REPORT.md's embedded tables == python -m pf_jax.analysis.science results/science."""
  with open(os.path.join(REPO, "REPORT.md")) as f:
    report = f.read()
  assert BEGIN in report and END in report
  embedded = report.split(BEGIN, 1)[1].split(END, 1)[0].strip()
  assert embedded == science.report(os.path.join(REPO, "results", "science")).strip()


def test_noisy_digits_labels():
  from pf_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  from pf_jax.datasets import noisy_digits  # pylint: disable=g-import-not-at-top

  _, clean = digits.load_split_arrays("train")
  for percent, k in ((25, 360), (50, 719)):  # round(0.25 * 1438) = 359.5 -> 360; 719
    _, labels, kept = noisy_digits.load_split_arrays("train", percent)
    assert (kept == clean).all() and int((labels != clean).sum()) == k
    assert labels.min() >= 0 and labels.max() <= 9
  _, test, test_clean = noisy_digits.load_split_arrays("test", 50)
  assert (test == test_clean).all()  # test labels are never corrupted
  # The draw is the documented one: permutation first, then shifts 1..9.
  rng = np.random.RandomState(noisy_digits.NOISE_SEED)
  flip = rng.permutation(1438)[:719]
  shift = rng.randint(1, 10, size=719)
  assert ((labels[flip] - clean[flip]) % 10 == shift).all()


def test_csv_is_the_jsonl_flat(folder):
  import csv  # pylint: disable=g-import-not-at-top

  science.write_csv(folder)
  with open(os.path.join(folder, "runs.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6  # the repeated key counted once
  sam = next(r for r in rows if r["method"] == "sam_steep" and r["seed"] == "2")
  assert (float(sam["rho"]), float(sam["eval/noisy_digits_sym50/top1"]), sam["m"]) == (
    0.1,
    0.95,
    "32",
  )
  assert next(r for r in rows if r["method"] == "adamw")["m"] == ""


def test_demo_number_is_the_committed_run():
  """README's and REPORT's seed-0 demo number is results/demo/default_seed0.json's."""
  with open(os.path.join(REPO, "results", "demo", "default_seed0.json")) as f:
    top1 = json.load(f)["results"]["eval/digits/top1"]
  want = f"{100 * top1:.2f}"
  for name in ("README.md", "REPORT.md"):
    with open(os.path.join(REPO, name)) as f:
      assert f"**{want}**" in f.read(), name


POOL_BEGIN, POOL_END = "<!-- pool tables: begin -->", "<!-- pool tables: end -->"


def test_report_pool_tables_are_what_the_committed_pool_gives():
  """REPORT.md's section 3 tables == results/pool/figure2.md == what `python -m pf_jax.analysis
  forgetting --runs_csv results/pool/forgetting_runs.csv` computes (10,000 permutations, seed 0),
  and the committed pool holds whole seeds: every (panel, m) the same seeds."""
  from pf_jax.analysis import figure2  # pylint: disable=g-import-not-at-top

  folder = os.path.join(REPO, "results", "pool")
  groups = figure2.read_runs_csv(os.path.join(folder, "forgetting_runs.csv"))
  assert len(groups) == 3
  seeds = {tuple(sorted(g["seed"][g["m"] == m])) for g in groups.values() for m in set(g["m"])}
  assert len(seeds) == 1 and len(seeds.pop()) >= 3
  results = {k: figure2.correlations(v, num_permutations=10_000, seed=0) for k, v in groups.items()}
  want = figure2.summary(groups, results).strip()
  with open(os.path.join(folder, "figure2.md")) as f:
    assert f.read().strip() == want
  with open(os.path.join(REPO, "REPORT.md")) as f:
    report = f.read()
  assert report.split(POOL_BEGIN, 1)[1].split(POOL_END, 1)[0].strip() == want


def test_launcher_estimate_uses_each_blocks_own_cost(folder, capsys):
  """noise50 has rows (15 CPU-s each, the fixture's), clean none (the default 50 CPU-s): seeds
  0-1 leave 2 x 6 - 4 = 8 noise50 runs and 12 clean runs, 8 x 15 + 12 x 50 = 720 s = 0.2 h (at
  50 s for every run it would be 1,000 s, printed 0.3)."""
  from launch import science as launcher

  assert (
    launcher.main(
      [
        f"--root={folder}/runs",
        f"--results={folder}",
        "--blocks=noise50,clean",
        "--seeds=0-1",
        "--dry_run",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("to do: 20 runs with sharpness and 0 search runs, about 0.2 CPU-hours")
  assert len(out) == 21 and "noise50 adamw rho=0 seed=0" not in out
