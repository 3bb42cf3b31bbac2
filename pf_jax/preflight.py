"""What `main.py --check_only` checks beyond the config's fields.

`check` reads config.init_from and compares it with the model (`pretrained.check`: shapes from
`jax.eval_shape`, nothing compiles) and looks for each dataset the run reads on disk (TFDS's
layout, without importing TensorFlow), so a launcher's dry run says what the run would stop on.
"""

import glob
import os

from pf_jax import dataset_catalog
from pf_jax import experiment
from pf_jax.errors import DASH


def default_data_dir() -> str:
  """TFDS's data directory when config.data_dir is None (tfds.core.constants.DATA_DIR)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(
    os.path.expanduser("~"), "tensorflow_datasets"
  )


def prepare_instructions(dataset: str, data_dir: str) -> str:
  """How to prepare `dataset` in `data_dir` (a sentence; pf_jax's datasets prepare themselves)."""
  name = dataset_catalog.DATASETS[dataset].tfds_name
  if dataset == "imagenet2012":
    return (
      "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
      f"ILSVRC2012_img_val.tar into {data_dir}/downloads/manual/ and run "
      f"`tfds build imagenet2012 --data_dir={data_dir}` (no network needed, about "
      "300 GB of disk while building)."
    )
  if dataset == "imagenet2012_real":
    return (
      f"put ILSVRC2012_img_val.tar into {data_dir}/downloads/manual/ and run "
      f"`tfds build imagenet2012_real --data_dir={data_dir}` (it also downloads the "
      "ReaL labels, so it needs network)."
    )
  return (
    f"run `tfds build {name} --data_dir={data_dir}` on a machine with network "
    f"access, then copy {data_dir}/{name}/ into this data_dir."
  )


def _prepared(tfds_name: str, data_dir: str) -> bool:
  """A prepared TFDS dataset: `<data_dir>/<name>[/<config>]/<version>/dataset_info.json`."""
  folder = os.path.join(data_dir, *tfds_name.split(":")[0].split("/"))
  return bool(
    glob.glob(os.path.join(glob.escape(folder), "**", "dataset_info.json"), recursive=True)
  )


def missing_data(config) -> str | None:
  """One line naming the first dataset of the run that is not prepared on disk (the field that
  names it, config.data_dir and how to prepare it), or None. Remote data_dirs are not looked at;
  pf_jax's own datasets (digits and its variants) are prepared by the run itself. main.py stops
  a run with it before TensorFlow's import and before it creates the workdir."""
  if config.data_dir is not None and "://" in config.data_dir:
    return None
  data_dir = config.data_dir if config.data_dir is not None else default_data_dir()
  wanted = [("dataset", config.dataset)] + [
    ("eval_datasets", name) for name in config.eval_datasets
  ]
  if config.analysis.collect_every_steps:
    wanted.append(("analysis.dataset", experiment.forgetting_dataset(config)))
  missing = []
  for field, name in wanted:
    spec = dataset_catalog.DATASETS[name]
    known = [n for _, n in missing]
    if not spec.auto_prepare and name not in known and not _prepared(spec.tfds_name, data_dir):
      missing.append((field, name))
  if not missing:
    return None
  (field, name), others = missing[0], [n for _, n in missing[1:]]
  also = f" (also not prepared: {', '.join(others)})" if others else ""
  return (
    f"config.{field}: {name!r} {DASH} not prepared in {data_dir} (config.data_dir="
    f"{config.data_dir!r}){also}. How to prepare it: " + prepare_instructions(name, data_dir)
  )


def check(config) -> list[str]:
  """--check_only's lines after the run's description: what config.init_from gives (read and
  compared with the model; ConfigError if it does not fit) and a dataset that is not prepared."""
  lines = []
  if config.init_from is not None:
    from pf_jax import pretrained  # pylint: disable=g-import-not-at-top  (orbax; torch for .pth)

    num_classes = dataset_catalog.DATASETS[config.dataset].num_classes
    lines.append(f"init_from: {pretrained.check(config, num_classes)}")
  data = missing_data(config)
  if data:
    lines.append(f"data: {data}")
  return lines
