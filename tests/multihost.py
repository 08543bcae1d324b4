"""Several JAX processes on one machine, as the hosts of a pod slice run them: one ``python -m bpo_jax`` per
process, joined through ``jax.distributed`` on a fresh loopback port with gloo CPU collectives.

``judge_server`` is an LLM judge on loopback for such runs: deterministic labels, a latency per request, and an
optional gate a test can hold requests at.

Every child's environment is built explicitly (the pytest process's XLA_FLAGS never leak into it), and a child
sees only what ``requirements.txt`` installs (``torchless.py``: no torch, no test extras). If a child
exits with a code the test did not allow, if one exits with an error while the others keep running longer than
``straggle`` seconds, or if the group overruns ``deadline``, every child is killed and the test fails: nothing
here can hang CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal as signals
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, NamedTuple

import pytest

from testing import ROOT, minimal_env, xla_flags
from torchless import pythonpath

DEADLINE = 300  # seconds for one group of processes


class Result(NamedTuple):
    returncode: int
    output: str  # stdout and stderr together
    seconds: float  # from the group's start to this process's exit


class Results(list):
    """One ``Result`` per process; ``signalled_at``: seconds from the group's start to the signal (or None)."""

    signalled_at: float | None = None


def free_port() -> int:
    """A loopback port free now, released at once: for a server this process starts itself. For a group's
    coordinator use :func:`reserved_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reserved_port():
    """A loopback port for a group's coordinator that no other group of this session can be given until the block
    ends. JAX's coordination service binds its port with ``SO_REUSEPORT``, so a second service on the same port
    starts without error, and a task joining the wrong one aborts the other group (exit -6, "Use error polling
    to propagate the following error to all tasks: ... with a different incarnation"). A port from
    :func:`free_port` is free again until the coordinator binds it, seconds later, so two xdist workers could
    both get it. Here a socket stays bound to the port with ``SO_REUSEPORT`` and never listens: the coordinator
    may bind beside it, connections reach only the coordinator, and no other ``bind`` can take the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def judge_server(latency: float = 0.0, gate: Callable[[], None] | None = None) -> ThreadingHTTPServer:
    """An OpenAI-compatible judge on 127.0.0.1 (``judge_url=http://127.0.0.1:{port}/v1/chat/completions``) that
    prefers the longer response (A on equal length): deterministic, so every run gets the same labels. Each
    request waits ``latency`` seconds, then ``gate()`` (which may block) before answering. Stop it with
    ``.shutdown()``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            if gate is not None:
                gate()
            text = body["messages"][0]["content"]
            a = re.search(r"Response A:\n(.*?)\n\nResponse B:", text, re.S).group(1)
            b = re.search(r"Response B:\n(.*?)\n\nExplain", text, re.S).group(1)
            answer = json.dumps({"choices": [{"message": {"role": "assistant", "content":
                                 f"Preferred: {'A' if len(a) >= len(b) else 'B'}"}}]}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def child_env(devices: int, **extra) -> dict:
    """A minimal environment: ``devices`` fake CPU devices (``testing.xla_flags``), the HF hub offline, unbuffered
    output, ``torchless.pythonpath`` (the checkout, or ``extra``'s ``PYTHONPATH``, then the block), so
    the child sees only what ``requirements.txt`` installs; ``extra`` adds or replaces the other variables."""
    path = pythonpath(extra.pop("PYTHONPATH", ROOT))
    return minimal_env(**{**dict(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                                 PYTHONUNBUFFERED="1", XLA_FLAGS=xla_flags(devices)), **extra, "PYTHONPATH": path})


def bpo_vars(n: int, i: int, port: int) -> dict:
    """bpo_jax's own launch variables for process ``i`` of ``n``."""
    return dict(BPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", BPO_NUM_PROCESSES=str(n), BPO_PROCESS_ID=str(i))


def _output_so_far(f) -> str:
    """What a child has written so far (``pread``: the shared file offset the child writes at stays put)."""
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def run_group(args_per_process, *, devices: int, cwd=None, signal_when: Callable[[], bool] | None = None,
              signal_on: str | None = None,
              signal: int = signals.SIGTERM, target: int = -1, allowed=(0, 2, 143), straggle: float = 60,
              deadline: float = DEADLINE, launch_vars: Callable[[int, int, int], dict] = bpo_vars,
              extra_env: dict | None = None, wrap: dict[int, list] | None = None) -> Results:
    """Start one ``python -m bpo_jax ARGS`` per entry of ``args_per_process`` (several: a distributed group on a
    fresh port) and wait for all. ``signal_when()``: once true, send ``signal`` to process ``target`` only;
    ``signal_on``: the same once this text appears in process 0's output.
    ``allowed``: exit codes that do not fail the test at once (a signalled process's own code always passes).
    ``wrap``: ``{i: [command, ...]}`` runs process ``i`` as ``command ... python -m bpo_jax ARGS``."""
    with reserved_port() as port:
        return _run_group(args_per_process, port, devices=devices, cwd=cwd, signal_when=signal_when,
                          signal_on=signal_on, signal=signal, target=target, allowed=allowed, straggle=straggle,
                          deadline=deadline, launch_vars=launch_vars, extra_env=extra_env, wrap=wrap)


def _run_group(args_per_process, port, *, devices, cwd, signal_when, signal_on, signal, target, allowed, straggle,
               deadline, launch_vars, extra_env, wrap) -> Results:
    n = len(args_per_process)
    procs, logs = [], []
    for i, args in enumerate(args_per_process):
        extra = {} if n == 1 else launch_vars(n, i, port)
        out = tempfile.TemporaryFile("w+")  # never left behind in the checkout, also when the group fails
        logs.append(out)
        procs.append(subprocess.Popen([*(wrap or {}).get(i, []), sys.executable, "-m", "bpo_jax", *args],
                                      env=child_env(devices, **extra, **(extra_env or {})),
                                      cwd=cwd[i] if cwd else ROOT, stdout=out, stderr=subprocess.STDOUT))
    start, signalled, first_error, signal_time = time.time(), None, None, None
    ended = [None] * n
    try:
        while None in [p.poll() for p in procs]:  # poll every process (any() would stop at the first running)
            now = time.time()
            for i, p in enumerate(procs):
                if p.returncode is not None and ended[i] is None:
                    ended[i] = now - start
            if now - start > deadline:
                raise TimeoutError(f"processes still running after {deadline} s")
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, *allowed) and i != signalled]
            if bad:
                raise RuntimeError(f"process {bad[0]} exited with {procs[bad[0]].returncode}")
            if first_error is None and any(p.returncode for p in procs):
                first_error = now
            if first_error is not None and now - first_error > straggle:
                raise RuntimeError(f"a process ended with an error while the others kept running for {straggle} s")
            due = (signal_when is not None and signal_when()) or (
                signal_on is not None and signal_on in _output_so_far(logs[0]))
            if signalled is None and due:
                signalled = range(n)[target]
                procs[signalled].send_signal(signal)
                signal_time = now - start
            time.sleep(0.2)
    except Exception as err:
        for p in procs:
            p.kill()
        texts = []
        for f in logs:
            f.seek(0)
            texts.append(without_stack_frames(f.read())[-8000:])
        pytest.fail(f"{err}; logs:\n" + "\n----\n".join(texts))
    results = Results()
    results.signalled_at = signal_time
    for i, (p, f) in enumerate(zip(procs, logs)):
        f.seek(0)
        results.append(Result(p.wait(), without_stack_frames(f.read()),
                              ended[i] if ended[i] is not None else time.time() - start))
        f.close()
    return results


def without_stack_frames(output: str) -> str:
    """``output`` without the C++ stack frames (``    @     0x…``) that an aborting XLA or coordination-service
    process prints after its error: they would fill the tail that a failed assertion shows, hiding the error."""
    lines = output.splitlines(keepends=True)
    kept = [line for line in lines if not re.match(r"\s+@\s+0x[0-9a-f]+ ", line)]
    dropped = len(lines) - len(kept)
    return "".join(kept) + (f"[{dropped} C++ stack frame lines left out]\n" if dropped else "")


def losses(run_dir) -> dict:
    """``{step: loss}`` from a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_losses(got: dict, want: dict, steps) -> None:
    assert sorted(got) == sorted(want) == list(steps), (sorted(got), sorted(want))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), step
