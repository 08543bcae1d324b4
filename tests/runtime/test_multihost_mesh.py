"""Meshes over several hosts as real slices lay them out: which host owns which batch rows.

On a pod slice JAX orders devices physically, so a mesh axis other than the batch axes can span hosts; two hosts
would then hold the same batch shards and each write its own rows into them. Here the device order is forced
(``mesh_device_ids``) to reproduce such layouts with CPU processes: a layout whose hosts own disjoint shards in an
interleaved order trains with the single-process losses; one whose tensor groups span hosts stops before any
compute with one ``error:`` line. A silent run with other losses fails either check. The default layout of four
processes (2 devices each, fsdp 4 x tensor 2) matches one process with 8 devices, fine-tuning the full model.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest

from bpo_jax.runtime import distributed
from multihost import ROOT, assert_same_losses, child_env, losses, run_group
from testing import write_minisum_folder

pytestmark = pytest.mark.slow  # several processes or a fresh venv (pyproject.toml's markers)


@pytest.fixture(scope="module")
def setting(tiny_policy_and_rm, tmp_path_factory):
    data = write_minisum_folder(tmp_path_factory.mktemp("mesh_data"), rows=10)
    policy, rm = tiny_policy_and_rm
    common = [f"model={policy}", f"data={data}", "annotator=reward_model", f"reward_model={rm}", "total_steps=2",
              "num_phases=1", "batch_size=4", "reward_batch_size=4", "max_new_tokens=4", "eval_max_new_tokens=4",
              "eval_size=2", "lora_rank=2", "learning_rate=5e-3", "seed=3", "export_policy=false"]
    return common, tmp_path_factory.mktemp("mesh_runs")


def _train_single(common, run_dir, devices, *mesh):
    [(rc, out, _)] = run_group([["train", *common, *mesh, f"run_dir={run_dir}"]], devices=devices)
    assert rc == 0, out[-3000:]
    return losses(run_dir)


def test_interleaved_hosts_train_as_one_process_and_shared_shards_are_refused(setting):
    common, runs = setting
    want = _train_single(common, runs / "single4", 4, "mesh_data=1", "mesh_fsdp=4")
    # CPU device ids: process 0 holds 0, 1; process 1 holds 2048, 2049.
    interleaved = ["train", *common, "mesh_data=1", "mesh_fsdp=4", "mesh_device_ids=0,2048,1,2049",
                   f"run_dir={runs / 'interleaved'}"]
    res = run_group([interleaved, interleaved], devices=2)
    assert [r.returncode for r in res] == [0, 0], res[0].output[-3000:]
    assert_same_losses(losses(runs / "interleaved"), want, [1, 2])

    spanning = ["train", *common, "mesh_data=1", "mesh_fsdp=2", "mesh_tensor=2", "mesh_device_ids=0,2048,1,2049",
                f"run_dir={runs / 'spanning'}"]
    for rc, out, _ in run_group([spanning, spanning], devices=2):
        assert rc == 2, out[-3000:]
        error = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "on hosts 0 and 1" in error[0] and "mesh_tensor=2" in error[0], out[-3000:]
    assert not (runs / "spanning" / "metrics.jsonl").exists()  # stopped before the first evaluation


def test_four_processes_fsdp_by_tensor_match_one_process(setting):
    """Full fine-tuning (the other tests here train LoRA) in two phases: the float32 masters, their moments and
    π_β's kept copy are sharded over hosts, and π_β ← π_θ runs across them between the phases."""
    common, runs = setting
    full_ft = ["mesh_data=1", "mesh_fsdp=4", "mesh_tensor=2", "lora_rank=0", "total_steps=4", "num_phases=2"]
    want = _train_single(common, runs / "single8", 8, *full_ft)
    four = ["train", *common, *full_ft, f"run_dir={runs / 'four'}"]
    res = run_group([four] * 4, devices=2)
    assert [r.returncode for r in res] == [0] * 4, res[0].output[-3000:]
    assert_same_losses(losses(runs / "four"), want, [1, 2, 3, 4])  # steps 2 and 4 move off log 2


def test_two_processes_sharing_one_tfds_dir_build_it_once(tmp_path):
    """As two nodes with one home directory: two processes prepare the tldr samples into one tfds_dir at the
    same moment; they take turns on the lock file, so one builds and the other opens its copy (two concurrent
    tfds builds of one folder fail when the second renames its temporary folder into place)."""
    code = ("import sys; from bpo_jax.data import builders; t = builders.Prepared.check('tldr', '', sys.argv[1]); "
            "t.build(); print('train rows', len(t.open()['train']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "tfds")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(1)) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count("Downloading and preparing dataset") for o in outs) == 1, outs  # tfds's line per build
    assert all("train rows 24" in o for o in outs), outs


def test_two_processes_sharing_one_tfds_dir_build_it_once_and_train(tiny_policy_and_rm, tmp_path):
    """The same through a 2-process run of the TL;DR config on a fresh tfds_dir: one build, then training."""
    policy, rm = tiny_policy_and_rm
    args = ["train", "--config", "configs/tldr_gemma2b.yaml", f"model={policy}", f"reward_model={rm}",
            f"tfds_dir={tmp_path / 'tfds'}", f"run_dir={tmp_path / 'run'}", "data_dir=", "total_steps=2",
            "num_phases=1",
            "batch_size=4", "reward_batch_size=4", "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=2",
            "lora_rank=2", "lora_alpha=4", "ensemble_size=1", "param_dtype=float32", "dtype=float32",
            "remat=false", "export_policy=false", "mesh_data=-1", "mesh_fsdp=1"]
    res = run_group([args, args], devices=2)
    assert [r.returncode for r in res] == [0, 0], [r.output[-3000:] for r in res]
    assert sum(r.output.count("Downloading and preparing dataset") for r in res) == 1, [r.output for r in res]
    assert sorted(losses(tmp_path / "run")) == [1, 2]


class _Dev:
    """A stand-in device: ``id`` and ``process_index`` are all the layout code reads (and ``platform`` and
    ``device_kind``, which JAX's mesh_utils reads)."""

    def __init__(self, i, p):
        self.id, self.process_index, self.platform, self.device_kind = i, p, "cpu", "cpu"

    def __repr__(self):
        return f"dev{self.id}@{self.process_index}"


@pytest.mark.parametrize("hosts,local,sizes", [(8, 4, (1, 8, 4)), (8, 4, (2, 4, 4)), (4, 8, (2, 4, 4)),
                                               (2, 4, (4, 1, 2)), (16, 4, (1, 16, 4))])
def test_host_aware_devices_keep_tensor_groups_inside_hosts(hosts, local, sizes):
    devices = [_Dev(p * 1000 + i, p) for p in range(hosts) for i in range(local)]
    arranged = distributed.host_aware_devices(sizes, devices)
    assert arranged.shape == sizes and sorted(d.id for d in arranged.flat) == sorted(d.id for d in devices)
    for group in arranged.reshape(-1, sizes[2]):
        assert len({d.process_index for d in group}) == 1
    mesh = type("M", (), {"devices": arranged, "axis_names": ("data", "fsdp", "tensor"),
                          "shape": dict(zip(("data", "fsdp", "tensor"), sizes))})()
    owned = distributed.host_batch_shards.__wrapped__(mesh)
    flat = sorted(s for v in owned.values() for s in v)
    assert flat == list(range(sizes[0] * sizes[1])) and len({len(v) for v in owned.values()}) == 1


def test_host_aware_devices_refuse_a_tensor_axis_wider_than_a_host():
    devices = [_Dev(p * 1000 + i, p) for p in range(8) for i in range(4)]
    assert distributed.host_aware_devices((1, 4, 8), devices) is None


def test_global_rows_state_the_global_shape_and_local_rows_refuse_misplaced_rows():
    """One process: the layout helpers fall back to the whole batch (the multi-process behaviour is above)."""
    mesh = distributed.make_mesh(1, 4, 2)
    x = np.arange(8 * 3).reshape(8, 3)
    g = distributed.global_rows(x, mesh)
    assert g.shape == (8, 3) and np.array_equal(distributed.local_rows(g, mesh), x)
    assert np.array_equal(distributed.host_batch_rows(mesh, 8), np.arange(8))
    with pytest.raises(ValueError, match="mesh_device_ids must name each of the 8 devices once"):
        distributed.make_mesh(1, 4, 2, device_ids=[0, 1, 2])
    assert jax.process_count() == 1
