"""A local GCS emulator (`gcp-storage-emulator`) on 127.0.0.1, for gs:// tests.

`start()` launches it in a subprocess on a free port with one bucket, in memory,
and returns the environment that points every client the pipeline uses at it:

  * STORAGE_EMULATOR_HOST: gcsfs (etils.epath's gs:// backend, `tda.fs`; orbax's
    metadata files go through epath too).
  * TENSORSTORE_GCS_HTTP_URL: tensorstore's `gcs` kvstore (table shards, orbax's
    arrays); GOOGLE_AUTH_TOKEN_FOR_TESTING: a fixed token, no credential lookup.
  * EPATH_USE_TF=false: epath's fsspec backend (tf.io.gfile, its default when
    TensorFlow is installed, has no endpoint setting); `tda.fs` sets it too.
  * GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs's bucket-type probe calls the
    Storage Control API, which the emulator does not serve (it would only warn).

One gap of the emulator is filled here: its media downloads omit the
`x-goog-generation` header that GCS sends and tensorstore's `gcs` kvstore parses
(without it OCDBT, orbax's array format, fails with "Malformed StorageGeneration"
when it rereads its manifest). `_SERVER` adds the object's generation and
metageneration headers to downloads, then runs the emulator's own `main`.
"""

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BUCKET = "tda-test"

_SERVER = """
import sys
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  except NotFound:
    pass
  return _download(request, response, storage, *args, **kwargs)

objects.download = download  # Before the server module builds its routes.
from gcp_storage_emulator.__main__ import main
main(sys.argv[1:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  """Yields the client environment {name: value} of an emulator that is stopped
  on exit."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file: a pipe nobody reads fills up and stalls the server.
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen(
      [sys.executable, "-c", _SERVER, "start", "--host=127.0.0.1",
       f"--port={port}", f"--default-bucket={bucket}", "--in-memory", "--quiet"],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).read()
        break
      except OSError as e:
        if proc.poll() is not None:
          log.seek(0)
          raise RuntimeError(f"GCS emulator exited: {log.read().decode()[-2000:]}") from e
        if time.time() > deadline:
          raise RuntimeError("GCS emulator did not answer within 60 s") from e
        time.sleep(0.2)
    yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
