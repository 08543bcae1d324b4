"""The LLM judge against an OpenAI-compatible server on 127.0.0.1 that the test starts itself: verdicts, the
seeded A/B order, caching, retries (Retry-After included), timeouts, malformed answers, concurrent requests in
input order, the request cap, and a tiny online run annotated end to end."""

import email.utils
import json
import logging
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bpo_jax.eval.judge import Judge, JudgeBudgetError, JudgeError, retry_after
from bpo_jax.eval.win_rate import score_against_references, win_rate_from_scores
from testing import write_minisum_folder

log = logging.getLogger(__name__)


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 64  # many clients connect at once; the default backlog of 5 could drop connections
    daemon_threads = True


class _Server:
    """Prefers the response containing 'good'; ``script`` lists per-request behaviours to play first;
    ``latency()`` seconds are slept before each answer; ``finished`` lists the answered prompts in order."""

    def __init__(self):
        self.requests, self.script, self.finished = [], [], []
        self.latency, self.retry_after = (lambda: 0.0), "1"
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    mode = outer.script.pop(0) if outer.script else "ok"
                time.sleep(outer.latency())
                if mode == "slow":
                    time.sleep(1.0)
                if mode in ("500", "503", "429"):
                    self.send_response(int(mode))
                    if mode == "429":
                        self.send_header("Retry-After", outer.retry_after)
                    self.end_headers()
                    return
                if mode == "400":
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(b"bad model")
                    return
                text = body["messages"][0]["content"]
                a = re.search(r"Response A:\n(.*?)\n\nResponse B:", text, re.S).group(1)
                b = re.search(r"Response B:\n(.*?)\n\nExplain", text, re.S).group(1)
                verdict = "Tie" if ("good" in a) == ("good" in b) else ("A" if "good" in a else "B")
                content = {"ok": f"A is fine.\nPreferred: {verdict}", "noverdict": "Both are nice."}.get(mode, "")
                payload = b"not json" if mode == "garbage" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                with outer.lock:
                    outer.finished.append(re.search(r"USER: (.*)", text).group(1))

        self.httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def bodies(self) -> list[str]:
        return [json.dumps(r["body"], sort_keys=True) for r in self.requests]


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _judge(server, **kw):
    return Judge(server.url, "judge-model", **{"backoff": 0.01, "timeout": 10.0, **kw})


def test_verdicts_in_both_orders_and_as_pair_scores(server):
    judge = _judge(server, api_key="sk-test")
    prompts = [f"question {i}" for i in range(8)]
    for p in prompts:
        assert judge.compare(p, "a good answer", "a bad answer") == 1.0
        assert judge.compare(p, "a bad answer", "a good answer") == 0.0
        assert judge.compare(p, "meh", "also meh") == 0.5
    texts = [r["body"]["messages"][0]["content"] for r in server.requests]
    shown_first = [re.search(r"Response A:\n(.*?)\n", t).group(1) for t in texts if "good" in t]
    assert "a good answer" in shown_first and "a bad answer" in shown_first  # seeded A/B order, not fixed
    assert server.requests[0]["auth"] == "Bearer sk-test" and server.requests[0]["body"]["model"] == "judge-model"
    scores = judge(["q", "q", "r", "r"], ["bad", "good", "good", "bad"])
    np.testing.assert_array_equal(scores, [0, 1, 1, 0])


def test_win_rate_against_references(server):
    judge = _judge(server)
    prompts = ["a", "b", "c", "d"]
    s, r = score_against_references(judge, prompts, ["good", "bad", "good", "x"], ["bad", "good", "bad", "y"])
    wr = win_rate_from_scores(s, r)
    assert wr.win_rate == (1 + 0 + 1 + 0) / 4 and wr.win_rate_ties_half == (1 + 0 + 1 + 0.5) / 4


def test_cache_on_disk_means_no_second_request(server, tmp_path):
    cache = str(tmp_path / "verdicts.jsonl")
    assert _judge(server, cache_path=cache).compare("q", "good", "bad") == 1.0
    sent = len(server.requests)
    again = _judge(server, cache_path=cache)
    assert again.compare("q", "good", "bad") == 1.0 and len(server.requests) == sent and again.requests_sent == 0


@pytest.mark.parametrize("mode", ["500", "garbage", "noverdict", "slow"])
def test_transient_failures_are_retried(server, mode):
    server.script = [mode]
    judge = _judge(server, timeout=0.3, retries=2)
    assert judge.compare("q", "good", "bad") == 1.0
    assert judge.requests_sent == 2


@pytest.mark.parametrize("mode, message", [
    ("slow", "no answer within 0.3 s"),
    ("garbage", "malformed response body"),
    ("noverdict", "names no verdict"),
])
def test_persistent_failures_raise_naming_the_problem(server, mode, message):
    server.script = [mode] * 3
    judge = _judge(server, timeout=0.3, retries=2)
    with pytest.raises(JudgeError, match=message):
        judge.compare("q", "good", "bad")
    assert judge.requests_sent == 3


def test_client_errors_are_not_retried_and_bad_urls_refused(server):
    server.script = ["400"]
    judge = _judge(server, retries=3)
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.compare("q", "good", "bad")
    assert judge.requests_sent == 1
    with pytest.raises(ValueError, match="must start with http"):
        Judge("127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError, match="even, equal number"):
        judge(["q"], ["a"])


def _comparisons(n, tag="q"):
    """``n`` comparisons whose right verdicts alternate (good first, then second) and whose expected scores
    are returned beside them."""
    comps = [(f"{tag} {i}", f"good answer {i}", f"bad answer {i}") if i % 2 else
             (f"{tag} {i}", f"bad answer {i}", f"good answer {i}") for i in range(n)]
    return comps, np.asarray([i % 2 for i in range(n)], np.float32)


def _timed(judge, comps):
    start = time.monotonic()
    out = judge.compare_many(comps)
    return out, time.monotonic() - start


@pytest.mark.slow
def test_concurrent_requests_are_at_least_five_times_faster(server):
    """200 comparisons at 100 ms each: 16 in flight take at most a fifth of the time of one at a time."""
    server.latency = lambda: 0.1
    comps, want = _comparisons(200)
    sequential, t_seq = _timed(_judge(server, concurrency=1), comps)
    concurrent, t_conc = _timed(_judge(server, concurrency=16), comps)
    log.info("judge speed-up: 200 comparisons at 100 ms: sequential %.2f s, 16 in flight %.2f s (x%.1f)",
             t_seq, t_conc, t_seq / t_conc)
    np.testing.assert_array_equal(sequential, want)
    np.testing.assert_array_equal(concurrent, want)
    assert len(server.requests) == 400 and t_conc <= t_seq / 5


def test_verdicts_come_back_in_input_order(server):
    rng = random.Random(0)
    server.latency = lambda: rng.uniform(0.0, 0.05)
    comps, want = _comparisons(60)
    judge = _judge(server, concurrency=12)
    np.testing.assert_array_equal(judge.compare_many(comps), want)
    assert sorted(server.finished) == sorted(p for p, _, _ in comps)
    assert server.finished != [p for p, _, _ in comps]  # the answers really arrived out of order
    scores = judge([p for p, _, _ in comps for _ in range(2)], [r for _, a, b in comps for r in (a, b)])
    np.testing.assert_array_equal(scores[0::2], want)  # all cached now: the same scores as pair scores
    assert len(server.requests) == 60


@pytest.mark.slow
def test_retry_after_is_waited_out(server):
    server.script = ["429"]
    judge = _judge(server, retries=2)
    start = time.monotonic()
    assert judge.compare("q", "good", "bad") == 1.0
    assert time.monotonic() - start >= 0.95 and judge.requests_sent == 2


def test_retry_after_is_capped_and_read_as_a_date(server):
    server.script, server.retry_after = ["429"], "3600"
    judge = _judge(server, retries=1, max_wait=0.2)
    start = time.monotonic()
    assert judge.compare("q", "good", "bad") == 1.0
    assert time.monotonic() - start < 2.0
    now = time.time()
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after("2") == 2.0 and retry_after("soon") is None and retry_after(None) is None


def test_failures_among_concurrent_requests_are_retried(server):
    server.script = ["500", "noverdict", "503", "garbage", "500"]
    comps, want = _comparisons(12)
    judge = _judge(server, concurrency=6, retries=3)
    np.testing.assert_array_equal(judge.compare_many(comps), want)
    assert judge.requests_sent == 12 + 5


def test_a_refused_request_stops_the_others_and_keeps_their_verdicts(server, tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    server.script, server.latency = ["400"], lambda: 0.05
    comps, _ = _comparisons(40)
    judge = _judge(server, cache_path=str(cache), concurrency=4)
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.compare_many(comps)
    assert len(server.requests) < 40  # no new request after the refusal was seen
    assert len(cache.read_text().splitlines()) == len(server.requests) - 1  # every other one is cached

def test_a_restarted_judge_sends_no_request_twice(server, tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    comps, want = _comparisons(40)
    first = _judge(server, cache_path=str(cache), concurrency=8)
    np.testing.assert_array_equal(first.compare_many(comps[:25]), want[:25])
    with open(cache, "a") as f:
        f.write('{"key": "cut sh')  # a line a killed run left half written
    again = _judge(server, cache_path=str(cache), concurrency=8)
    np.testing.assert_array_equal(again.compare_many(comps + comps[:5]), np.concatenate([want, want[:5]]))
    assert again.requests_sent == 15 and len(server.requests) == 40
    assert len(set(server.bodies())) == 40
    third = _judge(server, cache_path=str(cache))  # the verdict after the half line was not glued to it
    assert len(third.cache) == 40 and third.compare_many(comps).tolist() == want.tolist() and third.requests_sent == 0


def test_the_request_cap_stops_with_every_verdict_cached(server, tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    server.latency = lambda: 0.02
    comps, want = _comparisons(30)
    capped = _judge(server, cache_path=str(cache), concurrency=4, max_requests=10)
    with pytest.raises(JudgeBudgetError, match=r"judge_max_requests=10 reached.*rerun"):
        capped.compare_many(comps)
    assert capped.requests_sent == 10 and len(server.requests) == 10
    assert len(cache.read_text().splitlines()) == 10  # every request sent gave a cached verdict
    rerun = _judge(server, cache_path=str(cache), concurrency=4)
    np.testing.assert_array_equal(rerun.compare_many(comps), want)
    assert rerun.requests_sent == 20 and len(set(server.bodies())) == 30 == len(server.requests)


def test_the_request_count_is_logged_before_requesting(server, caplog):
    comps, _ = _comparisons(6)
    judge = _judge(server, concurrency=8)
    judge.compare_many(comps[:2])
    with caplog.at_level(logging.INFO, logger="bpo_jax.eval.judge"):
        judge.compare_many(comps)
    assert "judge: 4 comparisons to request (2 cached) with 4 in flight" in caplog.text


@pytest.mark.slow
def test_judge_annotates_a_tiny_online_run(server, tiny_policy_and_rm, tmp_path, capsys):
    from bpo_jax.__main__ import main as cli

    (tmp_path / "data").mkdir()
    data = write_minisum_folder(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", f"model={tiny_policy_and_rm[0]}", f"data={data}", f"run_dir={run}", "annotator=judge",
            f"judge_url={server.url}", "judge_model=judge-model", "judge_concurrency=4", "total_steps=2",
            "num_phases=1", "batch_size=2", "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=2",
            "lora_rank=2", "learning_rate=0.05", "tied_pairs=second", "export_policy=false"]
    assert cli(args) == 0
    out = capsys.readouterr().out  # the command's console: its INFO lines, once each
    assert len(re.findall(r"judge: \d+ comparisons to request \(\d+ cached\) with \d+ in flight", out)) >= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and "eval/win_rate" in records[-1]
    cached = (run / "judge_cache.jsonl").read_text().splitlines()
    assert len(server.requests) == len(cached) == len(set(server.bodies())) > 0


def test_concurrency_and_cap_are_validated_operational_keys():
    from bpo_jax.config import ConfigError, TrainConfig, run_identity_changes

    for bad in ({"judge_concurrency": 0}, {"judge_max_requests": -1}):
        with pytest.raises(ConfigError, match="judge_concurrency >= 1 and judge_max_requests >= 0"):
            TrainConfig(**bad)
    assert TrainConfig().judge_concurrency == 8 and TrainConfig().judge_max_requests == 0
    assert run_identity_changes(TrainConfig(), TrainConfig(judge_concurrency=2, judge_max_requests=50)) == []
