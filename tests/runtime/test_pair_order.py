"""The phase's pairs in the global order (``bpo_jax.train.pair_order``): the same kept rows in the same slots of
every step's global batch whatever the number of hosts, with each host holding the rows of its own slots; and
(slow, several processes) 2 processes x 2 devices train to the losses of 1 process x 4 devices with identical
and tied pairs dropped, FSDP over both hosts (π_β's weights moved across hosts into the sampling layout)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bpo_jax.train.pair_order import exchange, phase_plan, rows_to_send, stream_positions
from multihost import assert_same_losses, losses, run_group
from testing import write_minisum_folder

B, K = 8, 3  # global pairs per step, steps per phase


def _sampled(rows_by_host, batches, keep_rate, seed):
    """Each host's keep mask over its sampled rows, from one global mask over stream positions."""
    kept = np.random.default_rng(seed).random(batches * B) < keep_rate
    return np.stack([kept[stream_positions(r, batches, B)] for r in rows_by_host])


@pytest.mark.parametrize("seed", range(4))
def test_every_host_count_trains_the_first_kept_rows_in_the_same_slots(seed):
    batches = 8  # enough that K·B rows are kept at this rate
    one = [np.arange(B)]
    [(host, index)] = phase_plan(_sampled(one, batches, 0.6, seed), one, B, K)
    assert (host == 0).all()
    want = stream_positions(one[0], batches, B)[index]  # the first K·B kept positions, in order
    assert (np.diff(want) > 0).all()
    for rows_by_host in ([np.arange(4), np.arange(4, 8)], [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]),
                                                           np.array([6, 7])]):
        keeps = _sampled(rows_by_host, batches, 0.6, seed)
        plans = phase_plan(keeps, rows_by_host, B, K)
        pos = np.stack([stream_positions(r, batches, B) for r in rows_by_host])
        for rows, (h, i) in zip(rows_by_host, plans):
            slots = (np.arange(K)[:, None] * B + rows[None]).reshape(-1)  # this host's slots of every step
            np.testing.assert_array_equal(pos[h, i], want[slots])
            assert keeps[h, i].all()
        # Rows cross hosts (else the test would not exercise the exchange); every taken row is sent exactly once.
        assert any((h != p).any() for p, (h, _) in enumerate(plans))
        sent = sum(len(rows_to_send(plans, q)) for q in range(len(rows_by_host)))
        assert sent == K * B


def test_a_plan_that_stays_on_each_host_needs_no_exchange():
    """``identical_pairs=shrink`` keeps every row: each host trains on exactly the rows it sampled."""
    rows_by_host = [np.arange(4), np.arange(4, 8)]
    plans = phase_plan(np.ones((2, K * 4), bool), rows_by_host, B, K)
    for p, (h, i) in enumerate(plans):
        assert (h == p).all()
        np.testing.assert_array_equal(i, np.arange(K * 4))
    local = {"x": np.arange(K * 4) * 10}
    np.testing.assert_array_equal(exchange(local, plans, 0)["x"], local["x"])  # no collective on this path
    with pytest.raises(ValueError, match="a phase of 3 steps needs 24"):
        phase_plan(np.zeros((2, K * 4), bool), rows_by_host, B, K)


# ---- 2 x 2 = 1 x 4 -------------------------------------------------------------------------------------------

def _tying_judge():
    """An OpenAI-compatible judge: a tie when the two responses' lengths have the same parity, else the longer
    one. Symmetric in A and B, so the label depends on the two texts only (not on the judge's order)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
            a = re.search(r"Response A:\n(.*?)\n\nResponse B:", text, re.S).group(1)
            b = re.search(r"Response B:\n(.*?)\n\nExplain", text, re.S).group(1)
            verdict = "Tie" if len(a) % 2 == len(b) % 2 else ("A" if len(a) > len(b) else "B")
            body = json.dumps({"choices": [{"message": {"role": "assistant",
                                                        "content": f"Preferred: {verdict}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.mark.slow
def test_two_processes_drop_ties_and_identical_pairs_as_one_process(tiny_policy_and_rm, tmp_path):
    judge = _tying_judge()
    try:
        (tmp_path / "data").mkdir()
        data = write_minisum_folder(tmp_path / "data", rows=10)
        url = f"http://127.0.0.1:{judge.server_address[1]}/v1/chat/completions"
        # temperature 0.02: the tiny random policy's flat logits then give identical pairs now and then
        common = ["train", f"model={tiny_policy_and_rm[0]}", f"data={data}", "annotator=judge", "judge_model=test",
                  f"judge_url={url}", "total_steps=4", "num_phases=2", "batch_size=4", "max_new_tokens=2",
                  "temperature=0.02", "eval_size=2", "eval_max_new_tokens=2", "lora_rank=2", "learning_rate=5e-3",
                  "seed=3", "export_policy=false", "tied_pairs=drop", "identical_pairs=resample",
                  "mesh_data=1", "mesh_fsdp=-1"]  # FSDP over both hosts: pi_beta moves to its sampling layout
        [(rc, out, _)] = run_group([[*common, f"run_dir={tmp_path / 'one'}"]], devices=4)
        assert rc == 0, out[-3000:]
        two = [*common, f"run_dir={tmp_path / 'two'}"]
        results = run_group([two, two], devices=2)
        assert [r[0] for r in results] == [0, 0], [r[1][-3000:] for r in results]
    finally:
        judge.shutdown()
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    phases = [r for r in records if r.get("phase_start") == 1]
    assert sum(r["phase/tied_pairs_dropped"] for r in phases) > 0  # ties were dropped ...
    assert sum(r["phase/identical_pairs_dropped"] for r in phases) > 0  # ... and identical pairs
    assert_same_losses(losses(tmp_path / "two"), losses(tmp_path / "one"), [1, 2, 3, 4])
