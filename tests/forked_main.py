"""`python main.py ARGS` many times over without paying each time for Python's start and JAX's import.

A server process imports what main.py imports before it parses its flags (JAX, absl, pf_jax.cli,
config_validation, process, reporting, workdir; no TensorFlow, no JAX backend), then forks one
child per command.
The child runs main.py as `__main__` with the command's argv, stdin from /dev/null and its fds 1
and 2 in files, so from its first line main.py behaves as in a fresh interpreter, only the
imports are already done. Used by the tests that start main.py dozens of times with one
environment (tests/test_cli.py); runs that train keep their own subprocess.

  with MainServer(env) as server:
    r = server.run(["--workdir=/tmp/x", "--config.sam.rhoo=0.1"])  # a CompletedProcess
"""

import atexit
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")


class MainServer:
  """The test side: starts the server and sends it one command at a time."""

  def __init__(self, env: dict):
    self._proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__)],
      cwd=ROOT,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )

  def run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `python main.py *args`; on `timeout` the child is killed and returncode is -9."""
    self._proc.stdin.write(json.dumps({"args": args, "timeout": timeout}) + "\n")
    self._proc.stdin.flush()
    reply = self._proc.stdout.readline()
    if not reply:
      raise RuntimeError(f"the main.py server died (exit code {self._proc.wait()})")
    r = json.loads(reply)
    return subprocess.CompletedProcess(
      ["main.py", *args], r["returncode"], r["stdout"], r["stderr"]
    )

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=30)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _child(args: list[str], out_path: str, err_path: str):
  """Becomes `python main.py *args` from main.py's first line; never returns."""
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  for fd, path in ((1, out_path), (2, err_path)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  sys.stdout = sys.__stdout__  # the server points sys.stdout at stderr (its fd 1 is the channel)
  sys.argv = ["main.py", *args]
  code = 0
  try:
    runpy.run_path(MAIN, run_name="__main__")
  except SystemExit as e:  # what the interpreter does with sys.exit's argument
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      code = 1
    else:
      code = e.code or 0
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _serve():
  sys.path[0] = ROOT  # as for `python main.py`: the repository first, not tests/
  import jax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from absl import app  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  from pf_jax import cli  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from pf_jax import config_validation  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from pf_jax import process  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from pf_jax import reporting  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from pf_jax import workdir  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  channel = sys.stdout
  sys.stdout = sys.stderr  # nothing but replies on the channel
  tmp = tempfile.mkdtemp(prefix="pf_jax_forked_main_")
  for line in sys.stdin:
    request = json.loads(line)
    out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _child(request["args"], out_path, err_path)
    deadline = time.monotonic() + request["timeout"]
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        returncode = os.waitstatus_to_exitcode(status)
        break
      if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        returncode = -9
        break
      time.sleep(0.01)
    with open(out_path, errors="replace") as f, open(err_path, errors="replace") as g:
      reply = {"returncode": returncode, "stdout": f.read(), "stderr": g.read()}
    channel.write(json.dumps(reply) + "\n")
    channel.flush()


if __name__ == "__main__":
  _serve()
