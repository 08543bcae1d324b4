"""Mesh construction, logical rules, and the same logits on 1 device and on an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bpo_jax.models import ModelConfig, forward, init_params, load_pretrained, param_axes
from bpo_jax.runtime import distributed
from bpo_jax.runtime import sharding as shd
from tiny_models import FAMILIES, save_hf_model


def test_make_mesh():
    assert jax.device_count() == 8
    mesh = shd.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 12 devices, but 8 are available"):
        shd.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        shd.make_mesh(data=-1, fsdp=-1)


def test_spec_for_skips_axes_that_do_not_divide():
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    assert shd.spec_for(("layers", "embed", "mlp"), (2, 64, 96), mesh) == P(None, "fsdp", "tensor")
    assert shd.spec_for(("layers", "embed", "mlp"), (2, 63, 95), mesh) == P(None, None, None)
    custom = shd.DEFAULT_RULES + (("mlp", "fsdp"),)  # later pairs override earlier ones
    assert shd.spec_for(("embed", "mlp"), (64, 96), mesh, custom) == P("fsdp", None)  # fsdp already used


def test_partition_specs_for_a_params_pytree():
    cfg = ModelConfig.from_hf(FAMILIES["llama"]().to_dict())
    params = init_params(cfg, jax.random.key(0))
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    specs = shd.logical_to_specs(param_axes(cfg), params, mesh)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(params)
    assert specs["embed"] == P("tensor", "fsdp") and specs["layers"]["attn_norm"] == P(None, None)
    # Rules from a config: a list of (name, axis) pairs, e.g. pure FSDP with no tensor parallelism.
    fsdp_only = [("embed", "fsdp"), ("vocab", None), ("mlp", None), ("heads", None), ("kv_heads", None)]
    assert shd.logical_to_specs(param_axes(cfg), params, mesh, fsdp_only)["layers"]["q"] == P(None, "fsdp", None)
    placed = shd.shard(params, shd.logical_to_sharding(param_axes(cfg), params, mesh))
    assert placed["layers"]["gate"].sharding.spec == P(None, "fsdp", "tensor")


def test_sharded_load_gives_same_logits(tmp_path):
    save_hf_model("qwen2", tmp_path)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (4, 12)))
    single, _ = load_pretrained(str(tmp_path))
    sharded, _ = load_pretrained(str(tmp_path), mesh=mesh)
    q = sharded.params["layers"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)  # each device holds only its block
    want = forward(single.config, single.params, ids)[0]
    f = jax.jit(lambda p, x: forward(sharded.config, p, x)[0])
    got = f(sharded.params, distributed.global_rows(ids, mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    gathered = distributed.gather_to_host(sharded.params)
    np.testing.assert_array_equal(gathered["layers"]["q"], np.asarray(single.params["layers"]["q"]))
