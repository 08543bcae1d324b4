"""The LLM judge against an OpenAI-compatible server on 127.0.0.1 that the test starts itself: verdicts, the
seeded A/B order, caching, retries, timeouts and malformed answers."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bpo_jax.evaluate import score_against_references, win_rate_from_scores
from bpo_jax.judge import Judge, JudgeError


class _Server:
    """Prefers the response containing 'good'; ``script`` lists per-request behaviours to play first."""

    def __init__(self):
        self.requests, self.script = [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                mode = outer.script.pop(0) if outer.script else "ok"
                if mode == "slow":
                    time.sleep(1.0)
                if mode == "500":
                    self.send_response(500)
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def _judge(server, **kw):
    return Judge(server.url, "judge-model", **{"backoff": 0.01, **kw})


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
