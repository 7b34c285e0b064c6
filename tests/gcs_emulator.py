"""A GCS JSON API server on loopback (gcp-storage-emulator) that every gs:// layer talks to.

  from tests.gcs_emulator import gcs_bucket  # or use it anywhere: tests/conftest.py imports it

  def test_something(gcs_bucket):          # a fresh "gs://jaxfm-test/<test>-<hex>" folder
    run([... f"--out={gcs_bucket}/x"], env={**os.environ})   # subprocesses inherit the settings
    gcs_bucket.fs().ls(...)                # gcsfs, listing cache dropped (see `fs`)

One server per session, in a subprocess (its request log goes to a file, and it never competes
with the test for the GIL), in memory, stopped at the end of the session.

The emulator lacks two things of the GCS API that tensorstore's OCDBT writes (Orbax's arrays)
rely on, added here (`with_generations`): the object generation in a download's
`x-goog-generation` header, and the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions
(412, or 304 for a read), with which tensorstore updates a manifest only if nobody else did.
Without them the second write of a checkpoint's manifest fails ("Malformed StorageGeneration").
It also lacks `objects.move` (`.../o/SRC/moveTo/o/DST`), which gcsfs tries first for every
rename and, answered 501, retries for about 35 s before it copies and deletes; `_move` adds it.

The settings, in this process's environment while a test uses the fixture (and so in every
subprocess it starts):
  STORAGE_EMULATOR_HOST              gcsfs (and etils epath, which reaches gs:// through fsspec)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT  "false": gcsfs would first ask the Storage Control API for
                                     the bucket's layout over gRPC, which an emulator does not
                                     serve (time-outs where credentials are found)
  TENSORSTORE_GCS_HTTP_URL           tensorstore's GCS driver, which writes Orbax's arrays
  GOOGLE_AUTH_TOKEN_FOR_TESTING      tensorstore's credentials (its own tests set it)
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "jaxfm-test"  # tensorstore refuses bucket names under 3 characters
START_TIMEOUT_S = 30.0


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class GcsServer:
  """A running emulator: its URL, the bucket it serves, its log and the client settings."""

  url: str  # http://127.0.0.1:PORT
  bucket: str
  log: Path

  @property
  def env(self) -> dict[str, str]:
    """The environment variables that point gcsfs, epath and tensorstore at this server."""
    return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


def _generation(storage: Any, bucket: str | None, name: str | None) -> str | None:
  """The object's generation, None when it does not exist."""
  try:
    return storage.get_file_obj(bucket, name)["generation"] if bucket and name else None
  except Exception:  # noqa: BLE001 - the emulator's NotFound (or no such bucket)
    return None


def _object_name(request: Any) -> str | None:
  """The object a request reads or writes: in the path, the query or an upload's metadata."""
  params = request.params or {}
  if params.get("object_id"):
    return params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  if request.method == "POST" and "uploadType" in request.query:  # multipart or resumable
    data = request.data
    return data.get("meta", data).get("name") if isinstance(data, dict) else None
  return None


def _failed_precondition(request: Any, current: str | None) -> HTTPStatus | None:
  """The status GCS answers when a generation precondition of `request` does not hold."""
  match = request.query.get("ifGenerationMatch", [None])[0]
  if match is not None and match != (current or "0"):
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  if not_match is not None and not_match == (current or "0"):
    return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
  return None


def with_generations(handler: Callable[..., Any]) -> Callable[..., Any]:
  """`handler` with GCS's generation preconditions and `x-goog-generation` on reads (the
  emulator serves one request at a time, so the check and the write cannot interleave)."""

  def handle(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    bucket, name = (request.params or {}).get("bucket_name"), _object_name(request)
    status = _failed_precondition(request, _generation(storage, bucket, name))
    if status is not None:
      response.status = status
      return None
    out = handler(request, response, storage, *args, **kwargs)
    generation = _generation(storage, bucket, name)
    if request.method == "GET" and generation is not None and response.status < 300:
      response["x-goog-generation"] = generation
    return out

  return handle


def _move(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
  """GCS's objects.move within a bucket: the copy and the delete of one request."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  bucket, params = request.params["bucket_name"], request.params
  try:
    moved = objects._copy(request.base_url, storage, bucket, params["object_id"], bucket,  # pylint: disable=protected-access
                          params["dest_object_id"])
  except objects.NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, params["object_id"])  # pylint: disable=protected-access
  response.json(moved)


_MOVE_ROUTE = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
               r"(?P<dest_object_id>.*[^/]+)$")


def _serve(argv: list[str]) -> None:
  """`python -m gcp_storage_emulator ARGV` with `_move`, every request handler
  `with_generations`."""
  from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  server.HANDLERS = tuple((regex, {method: with_generations(handler)
                                   for method, handler in handlers.items()})
                          for regex, handlers in ((_MOVE_ROUTE, {"POST": _move}),
                                                  *server.HANDLERS))
  sys.exit(emulator.main(argv))


def _wait_until_serving(proc: subprocess.Popen, url: str, bucket: str, log: Path) -> None:
  """Polls the bucket's metadata until the server answers (at most START_TIMEOUT_S)."""
  deadline = time.monotonic() + START_TIMEOUT_S
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"the GCS emulator exited with {proc.returncode}:\n"
                         f"{log.read_text(errors='replace')[-2000:]}")
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as response:
        if response.status == 200:
          return
    except (urllib.error.URLError, ConnectionError, TimeoutError):
      pass
    if time.monotonic() > deadline:
      raise RuntimeError(f"the GCS emulator did not serve {url} within {START_TIMEOUT_S:.0f} s:"
                         f"\n{log.read_text(errors='replace')[-2000:]}")
    time.sleep(0.1)


@contextlib.contextmanager
def serving(log_dir: Path, bucket: str = BUCKET) -> Iterator[GcsServer]:
  """Runs the emulator (`_serve`) on a free loopback port with `bucket` created."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = log_dir / "gcs-emulator.log"
  with log.open("w") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_emulator", "start", "--host=127.0.0.1",
         f"--port={port}", f"--default-bucket={bucket}", "--in-memory", "--quiet"],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
  try:
    _wait_until_serving(proc, url, bucket, log)
    yield GcsServer(url, bucket, log)
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(10)


def fresh_gcsfs() -> None:
  """Makes this process's fsspec open gs:// with gcsfs's plain client (also when gcsfs was
  imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set) and drops cached instances, which
  keep the endpoint of the environment they were made in."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GcsServer]:
  """The session's emulator (started on first use)."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  with serving(tmp_path_factory.mktemp("gcs")) as server:
    yield server


class GcsFolder(str):
  """A gs:// folder of its own for one test (the str is the URL, no trailing slash)."""

  server: GcsServer

  def __new__(cls, url: str, server: GcsServer) -> "GcsFolder":
    folder = super().__new__(cls, url)
    folder.server = server
    return folder

  def fs(self) -> Any:
    """gcsfs on the emulator, listings cache dropped: other processes wrote meanwhile."""
    import fsspec  # pylint: disable=g-import-not-at-top
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return fs

  def files(self, under: str = "") -> list[str]:
    """Every object under this folder (or its `under` subfolder), relative to it, sorted."""
    root = self.removeprefix("gs://")
    prefix = f"{root}/{under}".rstrip("/")
    return sorted(name[len(root) + 1:] for name in self.fs().find(prefix))


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request) -> Iterator[GcsFolder]:
  """A fresh gs:// folder on the emulator, with this process's environment pointing gcsfs,
  epath and tensorstore (here and in subprocesses started during the test) at it."""
  for name, value in gcs_server.env.items():
    monkeypatch.setenv(name, value)
  fresh_gcsfs()
  name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
  yield GcsFolder(f"gs://{gcs_server.bucket}/{name}-{uuid.uuid4().hex[:8]}", gcs_server)
  fresh_gcsfs()  # no instance bound to the emulator outlives the test



if __name__ == "__main__":
  _serve(sys.argv[1:])
