"""Starts that only take a workdir's lock: the lock tests' cheap stand-in for main.py.

python tests/gcs_lock_probe.py WORKDIR REPS [HEARTBEAT_S STALE_AFTER_S], with $GO_DIR a local
directory: for each repetition R in 0..REPS-1, waits for the file $GO_DIR/go.R (so that several
probes start at once), takes the lock (`workdir.WorkdirLock`) and prints `R won` or
`R refused: <message>`; a winner then holds the lock (its heartbeat running) until
$GO_DIR/release.R exists, and prints `R held` or `R lost: <who took it>` before releasing it.
"""

import os
import sys
import time

from pf_jax import workdir as workdir_lib


def _wait_for(path):
  while not os.path.exists(path):
    time.sleep(0.005)


def main(argv):
  workdir, reps, go_dir = argv[1], int(argv[2]), os.environ["GO_DIR"]
  if len(argv) > 3:
    workdir_lib.HEARTBEAT_S, workdir_lib.STALE_AFTER_S = float(argv[3]), float(argv[4])
  for rep in range(reps):
    lock = workdir_lib.WorkdirLock(workdir)
    if lock.gcs:  # the storage client made (imports, credentials) before the go, not timed
      lock._gcs_lock._do(lambda bucket, exceptions: None)
    _wait_for(os.path.join(go_dir, f"go.{rep}"))
    try:
      lock.acquire()
    except workdir_lib.WorkdirLockedError as e:
      print(f"{rep} refused: {e}", flush=True)
      continue
    print(f"{rep} won", flush=True)
    _wait_for(os.path.join(go_dir, f"release.{rep}"))
    lost = lock.lost()
    lock.release()
    print(f"{rep} lost: {lost}" if lost else f"{rep} held", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
