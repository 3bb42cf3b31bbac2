"""Single-process reference run for tests/test_multiprocess.py.

Runs main.py unchanged (same flags) except that the training stream is the one of
`--emulate_processes` processes: each global batch is the concatenation of what
`input_pipeline.train_iterator(process_index=i, process_count=N)` yields for i = 0..N-1, i.e.
exactly the global batch that N real processes (each with the same number of local devices)
assemble with `jax.make_array_from_process_local_data` over the mesh of all devices.

  python tests/multiprocess_worker.py --emulate_processes=2 --workdir=DIR [main.py flags]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

import main  # pylint: disable=unused-import  (defines --config, --workdir, ...)
from pf_jax import input_pipeline

flags.DEFINE_integer(
  "emulate_processes", 1, "Number of processes whose data streams make up each global batch."
)
FLAGS = flags.FLAGS

_train_iterator = input_pipeline.train_iterator


def _emulated_train_iterator(
  dataset, *, local_batch_size, process_index=None, process_count=None, **kwargs
):
  n = FLAGS.emulate_processes
  assert process_index is None and process_count is None and local_batch_size % n == 0
  iterators = [
    _train_iterator(
      dataset, local_batch_size=local_batch_size // n, process_index=i, process_count=n, **kwargs
    )
    for i in range(n)
  ]
  for parts in zip(*iterators):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run(argv):
  input_pipeline.train_iterator = _emulated_train_iterator
  main.main(argv)


if __name__ == "__main__":
  app.run(run, flags_parser=main.parse_flags)
