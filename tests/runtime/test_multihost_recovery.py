"""Preemption at any moment and recovery that every host agrees on, with two CPU processes.

The annotator is an LLM judge served by the test on 127.0.0.1 with a fixed latency per request, so a phase's
collection and each evaluation take seconds: a SIGTERM sent to process 1 when process 0 announces the collection
(or the evaluation) lands inside it. Every process must exit (143) within the bound, and the resumed run must give
the per-step losses of an uninterrupted single-process run. A newest checkpoint that only process 1 cannot read
makes both processes fall back to the same older step.
"""

import json
import os
import shutil

import pytest

from multihost import assert_same_losses, judge_server, losses, run_group
from testing import write_minisum_folder

pytestmark = pytest.mark.slow  # several processes or a fresh venv (pyproject.toml's markers)


LATENCY = 1.0  # seconds per judge request
EXIT_BOUND = 30  # seconds from the signal to every process's exit


@pytest.fixture(scope="module")
def setting(tiny_policy_and_rm, tmp_path_factory):
    httpd = judge_server(LATENCY)
    data = write_minisum_folder(tmp_path_factory.mktemp("rec_data"), rows=10)
    common = [f"model={tiny_policy_and_rm[0]}", f"data={data}", "annotator=judge", "judge_model=test",
              f"judge_url=http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions", "total_steps=4",
              "num_phases=2", "batch_size=4", "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=2",
              "eval_every=2", "lora_rank=2", "learning_rate=5e-3", "checkpoint_every=1", "seed=3",
              "export_policy=false"]
    runs = tmp_path_factory.mktemp("rec_runs")
    [(rc, out, _)] = run_group([["train", *common, f"run_dir={runs / 'single'}"]], devices=4)
    assert rc == 0, out[-3000:]
    yield common, runs, losses(runs / "single")
    httpd.shutdown()


def _interrupted(common, run_dir, marker):
    train = ["train", *common, f"run_dir={run_dir}"]
    res = run_group([train, train], devices=2, signal_on=marker, target=1)
    assert res.signalled_at is not None, res[0].output[-2000:]
    assert [r.returncode for r in res] == [143, 143], [r.output[-2000:] for r in res]
    assert max(r.seconds for r in res) - res.signalled_at < EXIT_BOUND
    return train, res


def test_sigterm_during_collection_resumes_the_same_collection(setting):
    common, runs, want = setting
    run_dir = runs / "collect"
    # One judge request at a time keeps the collection seconds long, so the signal lands inside it; the resume
    # sends 8 at once (an operational key) and must still give the same labels, hence the same losses.
    _, res = _interrupted([*common, "judge_concurrency=1"], run_dir, "phase 2/2: collecting")
    assert "SIGTERM while collecting phase 2's pairs" in res[0].output, res[0].output[-2000:]
    assert max(losses(run_dir)) == 2  # nothing was saved after the phase-1 checkpoint
    train = ["train", *common, f"run_dir={run_dir}", "judge_concurrency=8"]
    again = run_group([train, train], devices=2)
    assert [r.returncode for r in again] == [0, 0], [r.output[-2000:] for r in again]
    assert f"resumed {run_dir} at step 2" in again[0].output
    assert_same_losses(losses(run_dir), want, [1, 2, 3, 4])


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare --mount (root) to give one process its own view of a file")
def test_sigterm_during_evaluation_then_a_checkpoint_one_host_cannot_read(setting):
    common, runs, want = setting
    run_dir = runs / "evaluate"
    common = [*common, "eval_every=1", "eval_size=6", "eval_batch_size=1"]  # 3 batches of >= 1 s each per host
    train, res = _interrupted(common, run_dir, "step 3: evaluating")
    assert "SIGTERM during the evaluation at step 3" in res[0].output, res[0].output[-2000:]

    # The newest checkpoint (step 3) is unreadable for process 1 alone: in a mount namespace of its own, its
    # data files read as garbage (as when one host's view of shared storage is stale or damaged). Process 0 could
    # restore step 3; both must fall back to step 2 together and redo step 3.
    files = sorted(str(f) for f in (run_dir / "checkpoints" / "3").glob("state/**/d/*") if f.is_file())
    assert files, sorted(str(p) for p in (run_dir / "checkpoints" / "3").rglob("*"))
    garbage = runs / "garbage"
    garbage.write_bytes(b"not a checkpoint")
    mounts = "; ".join(f"mount --bind {garbage} {f}" for f in files)
    own_view = ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "own_view"]
    again = run_group([train, train], devices=2, wrap={1: own_view})
    assert [r.returncode for r in again] == [0, 0], [r.output[-2000:] for r in again]
    out = again[0].output
    assert "checkpoint step 3" in out and "unreadable on process 1 " in out, out[-3000:]
    assert f"resumed {run_dir} at step 2" in out, out[-3000:]
    assert (run_dir / "checkpoints_broken" / "3").is_dir()
    assert_same_losses(losses(run_dir), want, [1, 2, 3, 4])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows if "eval/win_rate" in r}) == [0, 1, 2, 3, 4]
