"""Entry point: python main.py --config=configs/<name>.py[:arg] --workdir=<dir> [--config.x=v].

Without --config it trains the default (configs/default.py: ASAM ViT on scikit-learn's digits, no download).
`python main.py --help` lists every config field and the paper configs.

Order: command line and config -> validation (one-line errors, exit 2) -> TensorFlow, data and
compilation. A bad value therefore stops the run in about a second, before anything compiles.
"""

import sys

from pf_jax import process

if __name__ == "__main__":
  process.catch_signals_from_the_start()  # SIGTERM/SIGINT: exit 75, also while JAX imports
process.quiet_native_logs(sys.argv)  # TensorFlow's and XLA's C++ logs: before their import

import jax
from absl import app
from absl import flags
from absl import logging

from pf_jax import cli
from pf_jax import config_validation
from pf_jax import preflight
from pf_jax import reporting
from pf_jax import workdir as workdir_lib

cli.define_flags()  # --workdir, --config, ...: python main.py --help
FLAGS = flags.FLAGS
_RUN = {}  # set by parse_flags: the config and its note (what a `,local` variant changed)


def parse_flags(argv):
  """absl flags plus the config (cli.py); every problem is one `error:` line and exit 2."""
  try:
    rest, _RUN["config"], _RUN["note"] = cli.parse_flags(argv)
  except (cli.UsageError, config_validation.ConfigError) as e:
    process.fail(str(e))
  return rest


def main(argv):
  del argv  # parse_flags has checked it
  config, note, workdir = _RUN["config"], _RUN["note"], FLAGS.workdir
  verbose = process.quiet_logs(FLAGS.verbose, keep_library_logs=FLAGS["verbosity"].present)
  if FLAGS.check_only:  # creates nothing
    try:
      if FLAGS.compile_for:  # pf_jax/tpu_compile.py
        from pf_jax import tpu_compile  # pylint: disable=g-import-not-at-top

        sys.exit(tpu_compile.main(config, FLAGS.compile_for, note))
      num_devices = FLAGS.num_devices or jax.device_count()
      config_validation.validate(config, num_devices, 1)
      if workdir:
        workdir_lib.check_writable(workdir, create=False)
      checked = preflight.check(config)  # init_from against the model, the data on disk
    except ValueError as e:
      process.fail(str(e))
    print("config OK")
    print("\n".join([reporting.describe_run(config, num_devices, workdir, note), *checked]))
    return
  process.init_distributed(
    FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  created = workdir_lib.first_missing(workdir)  # removed again if the run leaves it empty
  try:
    config_validation.validate(config, jax.device_count(), jax.process_count())
    missing = preflight.missing_data(config)  # before TensorFlow's import and the workdir
    if missing:
      raise ValueError(missing)
    workdir_lib.check_writable(workdir)
  except ValueError as e:
    process.fail(str(e))
  if jax.process_index() == 0:  # tens of seconds on 2 cores: said, not silent (issue 30)
    logging.info("importing TensorFlow and the training system")
  with process.quiet_native_stderr(quiet=not verbose):  # TensorFlow's import: after the checks
    from pf_jax import checkpointing  # pylint: disable=g-import-not-at-top
    from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    from pf_jax import train  # pylint: disable=g-import-not-at-top
  if not verbose:
    input_pipeline.tfds.disable_progress_bar()
  process.lock_workdir(workdir)
  try:
    _train(checkpointing, input_pipeline, train, config, note, verbose)
  finally:
    process.release_workdir()
    workdir_lib.remove_if_unused(created, workdir)


def _train(checkpointing, input_pipeline, train, config, note, verbose):
  """train_and_evaluate; a known failure is one `error:` line, a preemption exit 75 (requeue)."""
  preempted = None
  try:
    results = train.train_and_evaluate(
      config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change, note=note
    )
  except input_pipeline.DatasetNotPreparedError as e:
    process.fail(f"config.data_dir: {config.data_dir!r} {cli.DASH} " + str(e).replace("\n", " "))
  except (workdir_lib.ConfigMismatchError, workdir_lib.DamagedFileError) as e:  # one per field
    process.fail(str(e))
  except config_validation.ConfigError as e:  # found late, e.g. a config.init_from checkpoint
    process.fail(str(e))
  except (checkpointing.CheckpointError, checkpointing.NonFiniteError) as e:
    process.fail(str(e), code=process.FAILED_EXIT_CODE)
  except checkpointing.StorageError as e:  # orbax's threads may still fail: no interpreter teardown
    process.fail_at_once(str(e), verbose)
  except checkpointing.Preempted as e:
    preempted = str(e)
  if preempted:  # outside `except`: the run's arrays are freed now, not in a slow teardown
    logging.warning("%s", preempted)
    sys.exit(process.PREEMPTED_EXIT_CODE)  # a distinct code: schedulers and launchers requeue
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
