"""π_β's sampling layout (``sampler.for_sampling``, ``sampling_layout``): on 8 CPU devices with ``mesh_fsdp=8``
the collection's decode loops hold no collective once the weights are replicated, sample the same pairs as the
training layout, and ``auto`` keeps the training layout when the copy would not fit."""

from __future__ import annotations

import logging
import math
import re
import types

import jax
import numpy as np
import pytest

from bpo_jax.config import TrainConfig
from bpo_jax.data.prompts import ArrayPrompts
from bpo_jax.eval.annotators import FunctionAnnotator
from bpo_jax.models import init_params, param_axes
from bpo_jax.runtime import sharding as shd
from bpo_jax.sample import sampler
from bpo_jax.train import loop
from bpo_jax.wiring.tasks import training_run
from testing import tiny_model_config

COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


class _Digits:
    """A tokenizer stand-in: a response decodes to its token ids."""

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(int(t)) for t in tokens)


def _computations(hlo: str) -> dict[str, str]:
    """``{name: body text}`` of every computation in an HLO module's text."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name, out[head.group(1)] = head.group(1), ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def loop_body_collectives(hlo: str) -> dict[str, list[str]]:
    """``{while body: the collectives in it and the computations it calls}`` for every while loop of an HLO
    module."""
    comps = _computations(hlo)
    found = {}
    for text in comps.values():
        for body in re.findall(r"\bbody=%?([\w.\-]+)", text):
            seen, todo, found[body] = set(), [body], []
            while todo:
                c = todo.pop()
                if c in seen or c not in comps:
                    continue
                seen.add(c)
                found[body] += [m.group(1) for m in COLLECTIVES.finditer(comps[c])]
                todo += re.findall(r"%([\w.\-]+)", comps[c])
    return found


def _collect(layout: str, params, mesh, model_config, programs: list):
    """The phase's pairs with π_β in ``layout``; ``programs`` gets each prefill/decode call's abstract args."""
    texts = [f"prompt {i}" for i in range(16)]
    ids = np.random.default_rng(0).integers(3, model_config.vocab_size, (16, 8)).astype(np.int32)
    prompts = ArrayPrompts(texts, ids, np.ones_like(ids), batch_size=8, seed=1)
    annotate = FunctionAnnotator(lambda prompt, response: float(len(response)))
    run = training_run(types.SimpleNamespace(config=model_config, params=params), _Digits(), prompts, annotate,
                       mesh=mesh, eos_token_ids=(2,))
    cfg = TrainConfig(total_steps=2, num_phases=1, batch_size=8, max_new_tokens=6, temperature=1.0,
                      sampling_layout=layout, tied_pairs="second")
    return loop.collect_pairs(cfg, run, params, jax.random.key(5))[0]


def test_sampling_layout_decodes_without_collectives_and_samples_the_same_pairs(monkeypatch):
    config = tiny_model_config()
    mesh = shd.make_mesh(data=1, fsdp=8, tensor=1)
    params = shd.shard(init_params(config, jax.random.key(0)),
                       shd.logical_to_sharding(param_axes(config), init_params(config, jax.random.key(0)), mesh))
    assert "fsdp" in params["layers"]["q"].sharding.spec  # the training layout shards the weights
    programs = {"train": [], "replicated": []}
    abstract = lambda tree: jax.tree.map(  # noqa: E731  (an uncommitted one-device array goes where the rest are)
        lambda x: x if not isinstance(x, jax.Array) else jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding if len(x.sharding.device_set) > 1 else None), tree)
    pairs = {}
    for layout, seen in programs.items():
        for name in ("_prefill", "_decode"):
            jitted = getattr(sampler, name)

            def spy(*a, _jitted=jitted, _seen=seen, **kw):
                _seen.append((_jitted, abstract(a), kw))  # before the call: its state argument is donated
                return _jitted(*a, **kw)

            monkeypatch.setattr(sampler, name, spy)
        pairs[layout] = _collect(layout, params, mesh, config, seen)
        monkeypatch.undo()

    counts = {layout: [loop_body_collectives(fn.lower(*a, **kw).compile().as_text()) for fn, a, kw in seen]
              for layout, seen in programs.items()}
    for layout in programs:  # two rounds of a prefill and a decode program; each decode loop is a while loop
        assert len(counts[layout]) == 4 and all(counts[layout][1::2]), counts[layout]
    assert all(found == [] for loops in counts["replicated"] for found in loops.values()), counts["replicated"]
    train = [max(map(len, loops.values())) for loops in counts["train"][1::2]]
    assert min(train) > 0, counts["train"]  # the training layout pays collectives at every token
    for k, v in pairs["train"].items():  # the same pairs: tokens exactly, log-probs up to summation order
        if v.dtype.kind in "iu":
            np.testing.assert_array_equal(pairs["replicated"][k], v, err_msg=k)
        else:
            np.testing.assert_allclose(pairs["replicated"][k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_auto_keeps_the_training_layout_when_the_copy_does_not_fit(monkeypatch, caplog):
    config = tiny_model_config()
    mesh = shd.make_mesh(data=1, fsdp=8, tensor=1)
    params = init_params(config, jax.random.key(0))
    params = shd.shard(params, shd.logical_to_sharding(param_axes(config), params, mesh))
    need = sampler.bytes_per_device(params, sampler.sampling_shardings(config, mesh))
    assert need == sum(x.nbytes for x in jax.tree.leaves(params))  # tensor=1: a whole copy on every device
    # The copy and, while it is unstacked, its layers again must fit the share of the free memory.
    enough = math.ceil(2 * need / sampler.SAMPLING_MEMORY_FRACTION)
    assert sampler.choose_layout("auto", need, enough) == "replicated"
    assert sampler.choose_layout("auto", need, enough - 2) == "train"
    assert sampler.choose_layout("replicated", need, 1) == "replicated"
    spec = lambda tree: tree["layers"]["q"].sharding.spec  # noqa: E731
    monkeypatch.setattr(sampler, "free_device_memory_bytes", lambda: 2 * need)  # the copy alone would fit
    with caplog.at_level(logging.INFO, logger="bpo_jax.sample.sampler"):
        kept = sampler.for_sampling(config, params, mesh, "auto")
    assert spec(kept) == spec(params) and "sampling in the training layout" in caplog.text
    monkeypatch.setattr(sampler, "free_device_memory_bytes", lambda: 4 * need)
    moved = sampler.for_sampling(config, params, mesh, "auto")
    assert "fsdp" not in spec(moved) and jax.tree.all(jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), moved, params))
    with pytest.raises(ValueError, match="sampling_layout='fsdp'; valid: auto, train, replicated"):
        sampler.for_sampling(config, params, mesh, "fsdp")


def test_free_device_memory_is_the_limit_less_what_is_in_use(monkeypatch):
    """TPU and GPU devices report ``bytes_limit`` and ``bytes_in_use``: auto decides from their difference, what
    the run's state leaves free; a device that reports neither (CPU) gives the host's share."""
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(jax, "local_devices", lambda: [Device({"bytes_limit": 16 << 30, "bytes_in_use": 5 << 30})])
    assert sampler.free_device_memory_bytes() == 11 << 30 and sampler.device_memory_bytes() == 16 << 30
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(None)])
    assert sampler.free_device_memory_bytes() == sampler.device_memory_bytes() > 0
