"""Costs that stay flat as hosts are added: a resume's readability check reads only this host's shards, the
export never holds a whole weight on every device, and ``gather_json`` compiles once per width bucket.

Measured in two processes x two CPU devices (``flat_costs_worker.py``, with counters around the functions that
do the work), and in one process on the suite's 8 devices for the export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bpo_jax.models import Decoder, init_params, param_axes, save_pretrained
from bpo_jax.runtime import distributed
from bpo_jax.runtime import sharding as shd
from multihost import bpo_vars, child_env, reserved_port
from testing import ROOT, TESTS, tiny_model_config

WORKER = os.path.join(TESTS, "runtime", "flat_costs_worker.py")
GATE_LAYER = 32 * 64 * 4  # bytes of one layer of the tiny model's gate/up/down (float32); the whole is 2 layers


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """Both processes' measurements (``[process 0's, process 1's]``) and the folder they wrote."""
    out = tmp_path_factory.mktemp("flat_costs")
    env = {"PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    with reserved_port() as port:
        procs = [subprocess.Popen([sys.executable, WORKER, str(out)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=child_env(2, **env, **bpo_vars(2, i, port)))
                 for i in range(2)]
        try:
            logs = [p.communicate(timeout=240)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
    return [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)], out


def test_json_width_is_a_power_of_two_with_a_floor():
    assert [distributed.json_width(n) for n in (0, 1, 256, 257, 1000, 1024, 1025)] == [
        256, 256, 256, 512, 1024, 1024, 2048]


@pytest.mark.slow
def test_gather_json_compiles_once_per_width(two_hosts):
    """Six payload sizes within one width lower nothing new after the first call; six within the next, one."""
    results, _ = two_hosts
    assert [r["json_lowerings"] for r in results] == [[0, 1], [0, 1]]


@pytest.mark.slow
def test_resume_check_reads_only_this_hosts_shards(two_hosts):
    """With the state's big array split over both hosts, each host's check reads its half of it, the small
    replicated array whole and its own pair rows: what it restores, about half the checkpoint, each once. A
    checkpoint of other shapes is still refused as incompatible (not set aside as unreadable)."""
    results, _ = two_hosts
    for r in results:
        ckpt = r["checkpoint"]
        assert ckpt["restored_ok"]
        assert sum(ckpt["read"]) == ckpt["expected"] == 1168
        assert ckpt["total"] == 2320  # what each host read before: the whole checkpoint
        assert ckpt["misfit"].startswith("the checkpoint at step 1 does not fit this run's shapes"), ckpt["misfit"]


@pytest.mark.slow
def test_export_from_two_processes_gathers_at_most_one_layer(two_hosts):
    """The export of weights split over two hosts equals, byte for byte, the export of the same weights from host
    memory; no collective moved more than one layer of the largest weight (a 4096-byte block budget)."""
    results, out = two_hosts
    for name in ("model.safetensors", "config.json"):
        assert (out / "sharded" / name).read_bytes() == (out / "reference" / name).read_bytes(), name
    for r in results:
        assert max(r["export_blocks"]) == GATE_LAYER, r["export_blocks"]


def test_export_on_eight_devices_equals_the_host_export(tmp_path, monkeypatch):
    """One process, weights split over 8 devices: byte-identical to the export from host memory, with no
    collective at all (each weight is assembled from its device shards on the host)."""
    cfg = tiny_model_config()
    host = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    mesh = shd.make_mesh(data=1, fsdp=4, tensor=2)
    params = shd.shard(host, shd.logical_to_sharding(param_axes(cfg), host, mesh))
    assert params["layers"]["gate"].addressable_shards[0].data.shape == (2, 8, 32)
    from jax.experimental import multihost_utils

    monkeypatch.setattr(multihost_utils, "process_allgather", lambda *a, **k: pytest.fail("a device gather"))
    save_pretrained(Decoder.from_params(cfg, params), None, str(tmp_path / "sharded"))
    save_pretrained(Decoder.from_params(cfg, host), None, str(tmp_path / "host"))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "host" / name).read_bytes(), name
