"""Meshes over several slices (hosts joined by the data-centre network): only the data axis crosses slices.

Fast: stand-in devices with ``slice_index`` (as TPU multislice devices report it) give the mesh JAX's hybrid
mesh gives over slices, whatever the process order; a shape whose fsdp would cross slices is refused with one
line naming a shape that works, and with ``mesh_slices=1`` (the user's choice) it is built with a warning naming
the axis. Slow: four CPU processes as two slices of two hosts (``mesh_slices=2``: consecutive processes form a
slice, as devices without ``slice_index`` are grouped) train to the losses of one process with eight devices.
"""

import logging

import numpy as np
import pytest
from jax.experimental import mesh_utils

from bpo_jax.config import ConfigError, TrainConfig, validate_for_processes
from bpo_jax.runtime import distributed, slices
from multihost import assert_same_losses, losses, run_group
from testing import write_minisum_folder


class _Dev:
    """A stand-in device: what the layout code and JAX's mesh_utils read."""

    platform = device_kind = "cpu"

    def __init__(self, i, process, slice_index=None):
        self.id, self.process_index = i, process
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"dev{self.id}@p{self.process_index}/s{getattr(self, 'slice_index', '-')}"


def _devices(hosts=4, local=2, slice_of=None):
    """``hosts`` processes of ``local`` devices; ``slice_of(process)`` its slice_index (None: no attribute)."""
    return [_Dev(p * 100 + i, p, None if slice_of is None else slice_of(p)) for p in range(hosts) for i in range(local)]


def _slices_along(arranged, slice_of):
    return np.vectorize(lambda d: slice_of[d.process_index], otypes=[int])(arranged)


@pytest.mark.parametrize("slice_of", [lambda p: p // 2, lambda p: p % 2],
                         ids=["slice-major processes", "interleaved processes"])
def test_two_slices_put_only_the_data_axis_across_them(slice_of):
    devices = _devices(slice_of=slice_of)
    arranged = distributed.arrange_devices((2, 2, 2), devices)
    ids = _slices_along(arranged, {p: slice_of(p) for p in range(4)})
    assert (ids[0] == 0).all() and (ids[1] == 1).all()  # slice-major over the data axis, by slice_index
    for group in arranged.reshape(-1, 2):  # each tensor group inside one host
        assert len({d.process_index for d in group}) == 1
    # JAX's hybrid mesh with the slices as granules gives this very array (CPU stand-ins: each slice in order)
    want = mesh_utils.create_hybrid_device_mesh((1, 2, 2), (2, 1, 1), devices)
    assert [d.id for d in arranged.flat] == [d.id for d in want.flat]
    assert distributed.arrange_devices((4, 2, 1), devices).shape == (4, 2, 1)  # data 4 = 2 per slice


def test_a_shape_whose_fsdp_crosses_slices_is_refused_or_warned_when_asked(caplog):
    devices = _devices(slice_of=lambda p: p // 2)
    with pytest.raises(ValueError) as err:
        distributed.arrange_devices((1, 8, 1), devices)
    message = str(err.value)
    assert "\n" not in message and "cannot keep fsdp and tensor inside each of the 2 slices" in message
    assert "mesh_data=2 mesh_fsdp=4 mesh_tensor=1" in message and "mesh_slices=1" in message
    working = distributed.arrange_devices((2, 4, 1), devices)  # the named shape is accepted
    assert slices.dcn_axes(working, ("data", "fsdp", "tensor"), slices.process_slices(devices)) == ["data"]

    with caplog.at_level(logging.INFO, logger="bpo_jax"):
        arranged = distributed.arrange_devices((1, 8, 1), devices, slices="1")
    assert arranged.shape == (1, 8, 1)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "the fsdp axis crosses the data-centre network between the 2 slices" in warning.getMessage()
    assert "mesh_data=2 mesh_fsdp=4 mesh_tensor=1" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bpo_jax"):
        distributed.arrange_devices((2, 2, 2), devices)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "over 2 slices of 2 hosts: only the data axis crosses slices" in caplog.records[0].getMessage()


def test_processes_without_slice_index_form_slices_of_consecutive_processes():
    devices = _devices()  # as CPU processes: no slice_index
    assert slices.slice_layout(0, devices) == {0: 0, 1: 0, 2: 0, 3: 0}  # auto: one slice, today's mesh
    assert slices.slice_layout(2, devices) == {0: 0, 1: 0, 2: 1, 3: 1}
    one = distributed.arrange_devices((1, 4, 2), devices)
    assert [d.id for d in one.flat] == [d.id for d in distributed.host_aware_devices((1, 4, 2), devices).flat]
    arranged = distributed.arrange_devices((2, 2, 2), devices, slices=2)
    assert [sorted({d.process_index for d in row.flat}) for row in arranged] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="mesh_slices=3 does not split 4 processes"):
        slices.slice_layout(3, devices)
    with pytest.raises(ValueError, match="the devices report 2 slices"):
        slices.slice_layout(4, _devices(slice_of=lambda p: p // 2))


def test_mesh_slices_setting():
    assert TrainConfig().mesh_slices == "auto"
    assert TrainConfig(mesh_slices="0").mesh_slices == "auto" and TrainConfig(mesh_slices=2).mesh_slices == "2"
    with pytest.raises(ConfigError, match="mesh_slices='two'"):
        TrainConfig(mesh_slices="two")
    validate_for_processes(TrainConfig(mesh_slices="2"), 4, 8)
    with pytest.raises(ConfigError, match="mesh_slices=3 does not split 4 processes"):
        validate_for_processes(TrainConfig(mesh_slices="3"), 4, 8)


@pytest.mark.slow
def test_four_processes_as_two_slices_train_as_one_process(tiny_policy_and_rm, tmp_path):
    """2 slices x 2 hosts x 2 devices, data across the slices and fsdp x tensor inside each: the losses of one
    process with 8 devices and the same mesh shape."""
    policy, rm = tiny_policy_and_rm
    (tmp_path / "data").mkdir()
    data = write_minisum_folder(tmp_path / "data", rows=10)
    common = [f"model={policy}", f"data={data}", "annotator=reward_model", f"reward_model={rm}", "total_steps=2",
              "num_phases=1", "batch_size=4", "reward_batch_size=4", "max_new_tokens=4", "eval_max_new_tokens=4",
              "eval_size=2", "lora_rank=2", "learning_rate=5e-3", "seed=3", "export_policy=false",
              "mesh_data=2", "mesh_fsdp=2", "mesh_tensor=2"]
    [(rc, out, _)] = run_group([["train", *common, f"run_dir={tmp_path / 'one'}"]], devices=8)
    assert rc == 0, out[-3000:]
    two_slices = ["train", *common, "mesh_slices=2", f"run_dir={tmp_path / 'slices'}"]
    res = run_group([two_slices] * 4, devices=2)
    assert [r.returncode for r in res] == [0] * 4, res[0].output[-3000:]
    assert "mesh data=2 x fsdp=2 x tensor=2 over 2 slices of 2 hosts" in res[0].output, res[0].output[-3000:]
    assert_same_losses(losses(tmp_path / "slices"), losses(tmp_path / "one"), [1, 2])
