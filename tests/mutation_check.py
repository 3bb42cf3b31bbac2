"""Mutation check: does the test suite catch plausible bugs in the library and training system?

  python tests/mutation_check.py            # every mutation: prints caught/missed and "caught K of N"
  python tests/mutation_check.py --check    # only that every mutation's source line still exists
  python tests/mutation_check.py --only NAME [--only NAME ...]

Each mutation is (name, file, exact source substring, replacement, test node ids). The whole
repository (without .git and virtualenvs) is copied once to a temporary directory; each mutation is
applied there alone, its tests run (`pytest -x`), and the file restored. A mutation is caught when
its tests fail (exit status 1); a substring that no longer occurs exactly once is reported "not
applicable" (keep the list in sync after a refactor: `--check`, which the default suite runs).
Exits non-zero unless every mutation applies and is caught. Takes tens of minutes on 2 cores.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF = "tests/test_train_reference.py"
MAP = f"{REF}::test_config_maps_to_the_method"
STEP = f"{REF}::test_trainer_step_equals_the_reference"
SHRINK = f"{REF}::test_shrink_and_perturb_acts_on_the_state_before_the_gradient"
FIXTURES = "tests/test_model_fixtures.py::test_model_computes_timms_function"
EVAL = "tests/test_eval_semantics.py"
CONSTANTS = "tests/test_paper_constants.py"
ANALYSIS = "tests/test_analysis.py"


class Mutation(NamedTuple):
  name: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]


MUTATIONS = (
  Mutation(
    "accumulation ignored",
    "pf_jax/sam_family.py",
    "    if accum_steps == 1:",
    "    if True:",
    (
      "tests/test_sam.py::test_accumulation_is_chunking_of_the_micro_batches",
      f"{STEP}[resnet50_imagenet:sgd:accum2]",
    ),
  ),
  Mutation(
    "SamSpec drops asam",
    "pf_jax/config_fields.py",
    'args=("SamSpec.asam",)',
    "args=()",
    (f"{MAP}[vit_s32_imagenet-asam_steep]",),
  ),
  Mutation(
    "SamSpec drops gsam_alpha",
    "pf_jax/config_fields.py",
    'args=("SamSpec.gsam_alpha",)',
    "args=()",
    (f"{MAP}[resnet50_imagenet-gsam_steep]",),
  ),
  Mutation(
    "SamSpec drops gsam_normalized_backup",
    "pf_jax/config_fields.py",
    'args=("SamSpec.gsam_normalized_backup",)',
    "args=()",
    (f"{MAP}[resnet50_imagenet-gsam_steep]",),
  ),
  Mutation(
    "SamSpec drops m",
    "pf_jax/config_fields.py",
    'args=("SamSpec.m",)',
    "args=()",
    (f"{MAP}[vit_s32_imagenet-sam_obf]",),
  ),
  Mutation(
    "config drops obf_alpha",
    "pf_jax/experiment.py",
    "  if config.sam.obf_alpha is not None:",
    "  if False:",
    (f"{MAP}[vit_s32_imagenet-obf_alpha_1e-1]",),
  ),
  Mutation(
    "OBF predictions swapped (config)",
    "pf_jax/config_fields.py",
    'args=("obf.predictions", "obf_fixed_alpha.predictions")',
    "args=()",
    (f"{MAP}[vit_s32_imagenet-sam_obf]",),
  ),
  Mutation(
    "OBF predictions swapped (objective)",
    "pf_jax/perturbations.py",
    'p = jax.nn.softmax(z) if predictions == "softmax" else jax.nn.sigmoid(z)',
    'p = jax.nn.sigmoid(z) if predictions == "softmax" else jax.nn.softmax(z)',
    ("tests/test_sam.py::test_matches_sequential_reference",),
  ),
  Mutation(
    "optimizer chain reordered",
    "pf_jax/experiment.py",
    "  return optax.chain(*parts), lr, rho",
    "  return optax.chain(*parts[::-1]), lr, rho",
    (f"{STEP}[cifar_finetune:vit_s32,cifar10,sam_obf:accum1]",),
  ),
  Mutation(
    "clipping dropped",
    "pf_jax/experiment.py",
    "  if config.clip_grad_norm is not None:",
    "  if False:",
    (f"{STEP}[cifar_finetune:vit_s32,cifar10,sam_obf:accum1]",),
  ),
  Mutation(
    "label smoothing ignored",
    "pf_jax/losses.py",
    "  return lambda logits, batch: fn(logits, batch, label_smoothing)",
    "  return lambda logits, batch: fn(logits, batch, 0.0)",
    (f"{STEP}[vit_s32_imagenet:label_smooth:accum1]",),
  ),
  Mutation(
    "weight decay on 1-D parameters",
    "pf_jax/optimizers.py",
    "    return jnp.ndim(leaf) > 1 and not is_bias and not any(n in NO_DECAY_NAMES for n in names)",
    "    return jnp.ndim(leaf) > 0 and not is_bias and not any(n in NO_DECAY_NAMES for n in names)",
    (f"{STEP}[resnet50_imagenet:shrink_perturb:accum1]",),
  ),
  Mutation(
    "weight decay on the position embedding",
    "pf_jax/optimizers.py",
    'NO_DECAY_NAMES = ("pos_embedding",)',
    "NO_DECAY_NAMES = ()",
    (f"{STEP}[resnet50_imagenet:shrink_perturb:accum1]",),
  ),
  Mutation(
    "shrink-and-perturb: gradient at the unshrunk parameters",
    "pf_jax/train.py",
    "      params, batch, step=state.step, rng=exp.step_key(state.step, seed_key)",
    "      state.params, batch, step=state.step, rng=exp.step_key(state.step, seed_key)",
    (f"{SHRINK}[shrink_perturb]",),
  ),
  Mutation(
    "shrink-and-perturb: BatchNorm statistics not shrunk",
    "pf_jax/train.py",
    "      lambda p, b: forward(p, batch_stats, b),",
    "      lambda p, b: forward(p, state.batch_stats, b),",
    (f"{SHRINK}[sam_steep]",),
  ),
  Mutation(
    "SGD momentum dropped",
    "pf_jax/optimizers.py",
    "    optax.trace(decay=momentum) if momentum else optax.identity(),",
    "    optax.identity(),",
    (f"{STEP}[resnet50_imagenet:shrink_perturb:accum1]",),
  ),
  Mutation(
    "AdamW b2 := b1",
    "pf_jax/experiment.py",
    "  parts.append(_OPTIMIZERS[config.optimizer](lr, **kw(config.optimizer)))",
    "  parts.append(_OPTIMIZERS[config.optimizer](lr, **{**kw(config.optimizer), "
    '**({"b2": config.b1} if config.optimizer == "adamw" else {})}))',
    (f"{STEP}[vit_s32_imagenet:label_smooth:accum1]",),
  ),
  Mutation(
    "one PRNG key for all chunks",
    "pf_jax/sam_family.py",
    "jax.vmap(lambda i: jax.random.fold_in(key, first_chunk + i))(jnp.arange(n_chunks))",
    "jax.vmap(lambda i: jax.random.fold_in(key, 0))(jnp.arange(n_chunks))",
    (f"{STEP}[vit_s32_imagenet:random:accum1]",),
  ),
  Mutation(
    "BatchNorm statistics from the perturbed pass",
    "pf_jax/sam_family.py",
    "  return g, aux, metrics",
    "  return g, forward(perturbed, batch)[1], metrics",
    (f"{STEP}[resnet50_imagenet:gsam_steep:accum1]",),
  ),
  Mutation(
    "warmup off by one",
    "pf_jax/schedules.py",
    "      optax.linear_schedule(0.0, lr_max, warmup_steps),",
    "      optax.linear_schedule(0.0, lr_max, warmup_steps + 1),",
    (f"{MAP}[vit_s32_imagenet-adamw]",),
  ),
  Mutation(
    "decay ends at 0 instead of lr_min",
    "pf_jax/schedules.py",
    "      optax.linear_schedule(lr_max, lr_min, max(total_steps - warmup_steps, 1)),",
    "      optax.linear_schedule(lr_max, 0.0, max(total_steps - warmup_steps, 1)),",
    (f"{MAP}[vit_s32_imagenet-adamw]",),
  ),
  Mutation(
    "rho schedule ignored",
    "pf_jax/experiment.py",
    "  if config.sam.rho_min is not None:",
    "  if False:",
    (f"{MAP}[vit_s32_imagenet-sam_steep]",),
  ),
  Mutation(
    "GSAM decomposition sign",
    "pf_jax/sam_family.py",
    "gi - spec.gsam_alpha * (bi - b_dot_u * ui)",
    "gi + spec.gsam_alpha * (bi - b_dot_u * ui)",
    ("tests/test_sam.py::test_matches_sequential_reference",),
  ),
  Mutation(
    "ASAM before/after swapped",
    "pf_jax/sam_family.py",
    '  if spec.asam in ("before", "both"):',
    '  if spec.asam in ("after", "both"):',
    ("tests/test_sam.py::test_matches_sequential_reference",),
  ),
  Mutation(
    "OBF alpha without the 1 - lambda normalization",
    "pf_jax/perturbations.py",
    "  return gamma * jnp.maximum((1.0 - lam / p_y) / (1.0 - lam), 0.0)",
    "  return gamma * jnp.maximum(1.0 - lam / p_y, 0.0)",
    ("tests/test_sam.py::test_matches_sequential_reference",),
  ),
  Mutation(
    "chunks of every device share keys",
    "pf_jax/sam_family.py",
    "  first_chunk = device * n_chunks // group",
    "  first_chunk = n_chunks // group",
    (f"{STEP}[vit_s32_imagenet:random:accum1]",),
  ),
  Mutation(
    "evaluation crop changed",
    "pf_jax/preprocessing.py",
    "  ox = (new_w - image_size) // 2",
    "  ox = (new_w - image_size) // 3",
    ("tests/test_input_pipeline.py::test_eval_image_is_the_central_crop_of_the_resized_image",),
  ),
  Mutation(
    "evaluation crop fraction changed",
    "pf_jax/preprocessing.py",
    "EVAL_CROP_FRACTION = 0.875",
    "EVAL_CROP_FRACTION = 1.0",
    ("tests/test_input_pipeline.py::test_eval_image_is_the_central_crop_of_the_resized_image",),
  ),
  Mutation(
    "training flip up-down",
    "pf_jax/preprocessing.py",
    "    image = tf.image.stateless_random_flip_left_right(image, flip_seed)",
    "    image = tf.image.stateless_random_flip_up_down(image, flip_seed)",
    ("tests/test_input_pipeline.py::test_train_image_is_the_image_or_its_mirror",),
  ),
  Mutation(
    "ImageNet-R subset ignored",
    "pf_jax/train.py",
    "      logits = logits[:, jnp.asarray(subset)]",
    "      logits = logits",
    ("tests/test_train.py::test_evaluation_counts_top1_real_and_subset_by_hand",),
  ),
  Mutation(
    "ReaL counts examples without real labels",
    "pf_jax/train.py",
    '      valid = batch["real_valid"] * mask',
    "      valid = mask",
    ("tests/test_train.py::test_evaluation_counts_top1_real_and_subset_by_hand",),
  ),
  Mutation(
    "sharpness of the softmax loss for a sigmoid run",
    "pf_jax/analysis/sharpness.py",
    "  loss = losses.get_loss(config.loss, 0.0)  # the authors' Hessian: no label smoothing",
    '  loss = losses.get_loss("softmax_xent", 0.0)',
    ("tests/test_analysis.py::test_checkpoint_sharpness_is_the_top_eigenvalue_of_a_known_hessian",),
  ),
  Mutation(
    "non-finite step kept (reaches the checkpoint)",
    "pf_jax/train.py",
    '    finite = checkpointing.all_finite((metrics["loss"], grads, params, new_stats, opt_state))',
    "    finite = jnp.bool_(True)",
    ("tests/test_runs_safe.py::test_a_non_finite_step_is_skipped_inside_the_step_with_batch_norm",),
  ),
  # The models' function, checked against timm's logits without torch (tests/data/models).
  Mutation(
    "ResNet max-pool padded as XLA's SAME",
    "pf_jax/models/resnet.py",
    "x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))",
    'x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")',
    (f"{FIXTURES}[resnet50]",),
  ),
  Mutation(
    "ResNet stem: ReLU before BatchNorm",
    "pf_jax/models/resnet.py",
    '(7, 7), (2, 2), name="conv_init")(x)\n      x = norm(name="bn_init")(x)\n      x = self.act(x)',
    '(7, 7), (2, 2), name="conv_init")(x)\n      x = self.act(x)\n      x = norm(name="bn_init")(x)',
    (f"{FIXTURES}[resnet50]",),
  ),
  Mutation(
    "ViT GELU approximated (tanh)",
    "pf_jax/models/vit.py",
    "x = nn.gelu(x, approximate=False)",
    "x = nn.gelu(x, approximate=True)",
    (f"{FIXTURES}[vit_s32]",),
  ),
  Mutation(
    "ViT pools the first token",
    "pf_jax/models/vit.py",
    "x = jnp.mean(x.astype(jnp.float32), axis=1)",
    "x = x[:, 0].astype(jnp.float32)",
    (f"{FIXTURES}[vit_s16]",),
  ),
  # Evaluation in inference mode (BatchNorm's running statistics).
  Mutation(
    "evaluation with batch statistics",
    "pf_jax/train.py",
    'logits, _ = exp.apply(params, batch_stats, batch["image"].astype(exp.dtype), False)',
    'logits, _ = exp.apply(params, batch_stats, batch["image"].astype(exp.dtype), True)',
    (f"{EVAL}::test_eval_step_uses_running_statistics",),
  ),
  Mutation(
    "collection with batch statistics",
    "pf_jax/train.py",
    'forward = lambda p, b: exp.apply(p, batch_stats, b["image"], False)[0]',
    'forward = lambda p, b: exp.apply(p, batch_stats, b["image"], True)[0]',
    (f"{EVAL}::test_collect_step_uses_running_statistics",),
  ),
  Mutation(
    "sharpness with batch statistics",
    "pf_jax/analysis/sharpness.py",
    'logits = model.apply(dict(variables, params=p), batch["image"], train=False)',
    'logits = model.apply(dict(variables, params=p), batch["image"], train=True, mutable=["batch_stats"])[0]',
    (f"{EVAL}::test_sharpness_uses_running_statistics",),
  ),
  # Defined constants (tests/test_paper_constants.py states them as the paper does).
  Mutation(
    "thresholds from 10^-10",
    "pf_jax/analysis/information.py",
    "THRESHOLD_EXPONENTS = np.linspace(-12.0, 0.0, NUM_THRESHOLDS)",
    "THRESHOLD_EXPONENTS = np.linspace(-10.0, 0.0, NUM_THRESHOLDS)",
    (f"{CONSTANTS}::test_thresholds_are_ten_to_100_exponents_from_minus_12_to_0",),
  ),
  Mutation(
    "BatchNorm momentum 0.99",
    "pf_jax/models/resnet.py",
    "      momentum=0.9,",
    "      momentum=0.99,",
    (f"{EVAL}::test_training_mode_normalizes_by_the_batch_and_moves_running_statistics_by_0_1",),
  ),
  Mutation(
    "ViT final LayerNorm epsilon 1e-5",
    "pf_jax/models/vit.py",
    'nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, name="fc_norm")',
    'nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name="fc_norm")',
    (f"{CONSTANTS}::test_vit_layer_norms_have_timms_epsilon_1e_6[vit_s32]",),
  ),
  Mutation(
    "permutation p: x permuted by perm, not perm^-1",
    "pf_jax/analysis/correlation.py",
    "_pair_signs(x[np.argsort(perms, axis=1)])",
    "_pair_signs(x[perms])",
    (f"{ANALYSIS}::test_permutation_pvalues_are_the_sequential_ones_per_column_and_of_the_max",),
  ),
  Mutation(
    "family-wise p against the smallest observed tau",
    "pf_jax/analysis/correlation.py",
    "taus.max(axis=1) >= observed.max() - 1e-12",
    "taus.max(axis=1) >= observed.min() - 1e-12",
    (f"{ANALYSIS}::test_permutation_pvalues_are_the_sequential_ones_per_column_and_of_the_max",),
  ),
  Mutation(
    "science: 'both arms at chance' when either is",
    "pf_jax/analysis/science.py",
    'if max(rec["arm_means"]) < TRAINED_TOP1:',
    'if min(rec["arm_means"]) < TRAINED_TOP1:',
    ("tests/test_science.py::test_decisions",),
  ),
)


def _copy_tree(dst: pathlib.Path) -> None:
  ignore = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", "results", "*.egg-info"
  )
  shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def check(mutations=MUTATIONS) -> list[str]:
  """Problems: a source substring not occurring exactly once in its file, a missing test."""
  problems = []
  for m in mutations:
    path = ROOT / m.file
    count = path.read_text().count(m.old) if path.exists() else 0
    if count != 1:
      problems.append(f"{m.name}: {m.file} holds {m.old.strip()!r} {count} times (need exactly 1)")
    for test in m.tests:
      file, _, func = test.partition("::")
      func = func.split("[")[0]
      test_path = ROOT / file
      if not test_path.exists() or f"def {func}(" not in test_path.read_text():
        problems.append(f"{m.name}: test {test} does not exist")
  names = [m.name for m in mutations]
  problems += [f"duplicate mutation name {n!r}" for n in set(names) if names.count(n) > 1]
  return problems


def run(mutations) -> int:
  start, caught = time.time(), 0
  with tempfile.TemporaryDirectory(prefix="pf_jax_mutants_") as tmp:
    tree = pathlib.Path(tmp)
    _copy_tree(tree)
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    for i, m in enumerate(mutations, 1):
      path = tree / m.file
      original = path.read_text()
      if original.count(m.old) != 1:
        print(f"[{i}/{len(mutations)}] NOT APPLICABLE  {m.name}", flush=True)
        continue
      path.write_text(original.replace(m.old, m.new))
      t = time.time()
      try:
        out = subprocess.run(
          [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-n",
            "0",  # one process: a few tests each, stopped at the first failure
            "-p",
            "no:cacheprovider",
            "-m",
            "slow or not slow",
            *m.tests,
          ],
          cwd=tree,
          env=env,
          capture_output=True,
          text=True,
        )
      finally:
        path.write_text(original)
      # 1: tests ran and failed. Anything else (collection error, no tests) is not a catch.
      status = {0: "MISSED", 1: "caught"}.get(
        out.returncode, f"ERROR (pytest exit {out.returncode})"
      )
      caught += out.returncode == 1
      print(
        f"[{i}/{len(mutations)}] {status:8s} {m.name}  ({time.time() - t:.0f} s; {', '.join(m.tests)})",
        flush=True,
      )
      if out.returncode not in (0, 1):
        print(out.stdout[-2000:], out.stderr[-2000:], sep="\n")
  print(f"caught {caught} of {len(mutations)} ({time.time() - start:.0f} s)")
  return 0 if caught == len(mutations) else 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="only check that every mutation applies")
  parser.add_argument("--only", action="append", default=[], help="run only this mutation (name)")
  args = parser.parse_args(argv)
  problems = check()
  for p in problems:
    print("NOT APPLICABLE:", p)
  if args.check:
    print(f"{len(MUTATIONS) - len(problems)} of {len(MUTATIONS)} mutations apply")
    return 1 if problems else 0
  selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
  if args.only and len(selected) != len(args.only):
    print(f"unknown mutation in {args.only}; names: {[m.name for m in MUTATIONS]}")
    return 2
  return max(run(selected), 1 if problems else 0)


if __name__ == "__main__":
  sys.exit(main())
