"""main.py for a gs:// workdir on the emulator (tests/gcs_emulator.py): the same command, except
that TensorBoard events, which TensorFlow writes through its own GCS client (its endpoint cannot
be pointed at an emulator), go to the same path under the local directory $GCS_EVENTS_DIR
(gs://bucket/run -> $GCS_EVENTS_DIR/bucket/run). Everything else is main.py's own storage code.

python tests/gcs_main.py --workdir=gs://bucket/run [main.py flags]
"""

import logging
import os
import runpy
import sys

import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _local(path):
  path = os.fspath(path)
  if path.startswith("gs://"):
    return os.path.join(os.environ["GCS_EVENTS_DIR"], path[len("gs://") :])
  return path


_create_file_writer = tf.summary.create_file_writer
tf.summary.create_file_writer = lambda logdir, *a, **k: _create_file_writer(_local(logdir), *a, **k)
# gcsfs tries Cloud Storage's moveTo first (not emulated) and logs its failure before copying.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

if __name__ == "__main__":
  sys.argv = [os.path.join(ROOT, "main.py")] + sys.argv[1:]
  runpy.run_path(sys.argv[0], run_name="__main__")
