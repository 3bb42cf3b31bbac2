"""Entry point: python main.py --config=configs/<name>.py[:arg] --workdir=<dir> [--config.x=v].

Without --config it trains the default (OBF-SAM ViT on scikit-learn's digits, no download).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pf_jax import checkpointing
from pf_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                       "default.py"), "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.", required=True)
flags.DEFINE_bool("allow_config_change", False,
                  "Continue the run in --workdir although its config differs from the stored one.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): 'auto' does it when a multi-host environment is "
                  "detected (TPU pod, SLURM) or --coordinator_address is given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without auto-detection).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def _init_distributed():
  multihost_env = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS"))
  if FLAGS.distributed == "off" or (FLAGS.distributed == "auto" and not multihost_env
                                     and not FLAGS.coordinator_address):
    return
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _init_distributed()
  logging.info("JAX process %d / %d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  preempted = None
  try:
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                       allow_config_change=FLAGS.allow_config_change)
  except checkpointing.Preempted as e:
    preempted = str(e)
  if preempted:  # outside `except`: the run's arrays are freed now, not in a slow interpreter teardown
    logging.warning("%s", preempted)
    sys.exit(checkpointing.PREEMPTED_EXIT_CODE)  # a distinct code: schedulers and launchers requeue
  logging.info("Final evaluation: %s", results)
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))


if __name__ == "__main__":
  app.run(main)
