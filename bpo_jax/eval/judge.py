"""An LLM judge over an OpenAI-compatible chat-completions API, as in the paper's GPT-4 evaluation.

Nothing is ever sent anywhere unless a user builds a ``Judge`` with an endpoint (``annotator=judge`` with
``judge_url`` in a config). The judge sees a prompt and two responses, labelled A and B in a seeded random order
(so position bias averages out), and must end its answer with ``Preferred: A`` or ``Preferred: B`` (or
``Tie``).

Requests: up to ``concurrency`` (``judge_concurrency``) are in flight at once, from a bounded thread pool; the
results come back in the order of the inputs and the A/B order of each comparison is seeded by the comparison
itself, so a run's labels do not depend on thread scheduling. Each request has a timeout and is retried up to
``retries`` times: after HTTP 429/503 it waits what the server's ``Retry-After`` says (seconds or an HTTP date,
at most ``max_wait`` seconds), otherwise (5xx, timeouts, connection errors, malformed bodies, answers that name
no verdict) it backs off exponentially with jitter. Other 4xx answers are not retried (``JudgeRefused``). Out of
retries is transient (``JudgeError``: exit 1, restarted by the launchers); a refusal or the request cap below is
the user's to fix (exit 2, ``bpo_jax.runtime.exits``).

Cache: every verdict is appended to a JSON-lines file (keyed by the exact request) under one lock and flushed at
once, so a killed run loses at most the requests in flight and a rerun or resumed evaluation asks nothing twice.
With several hosts each host judges its own rows and keeps its own file (``tasks._judge_cache``): files are not
shared for appending.

Budget: ``max_requests`` (``judge_max_requests``, 0 = no cap) bounds the HTTP requests one ``Judge`` sends (one
command's run, retries included; on several hosts, each host's). When the next request would exceed it, no new
request starts, those in flight finish into the cache and ``JudgeBudgetError`` names the key; a rerun continues
from the cache.

As an annotator it scores the loop's sample pairs (rows 2i and 2i+1 of a call are one prompt's two samples):
the preferred one gets 1, the other 0, a tie ½ each. For win rates it compares each response with the human
reference directly (``win_scores``). Before its first request each call logs one line: how many comparisons it
will request, how many the cache answers, and how many requests go out at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from bpo_jax.data.prompts import conversation
from bpo_jax.runtime import distributed, exits

log = logging.getLogger(__name__)

TEMPLATE = """You compare two responses to the same conversation and decide which is better: more helpful, \
accurate, harmless and concise. Do not let the order or the length of the responses sway you.

Conversation:
{conversation}

Response A:
{a}

Response B:
{b}

Explain briefly, then end with one line: "Preferred: A", "Preferred: B" or "Preferred: Tie"."""

_VERDICT = re.compile(r"preferred\s*:\s*\**\s*(A|B|tie)\b", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint could not give a verdict after its retries: a transient failure (``exit_code``,
    ``bpo_jax.runtime.exits``), which a later run may get past."""

    exit_code = exits.TRANSIENT


class JudgeRefused(JudgeError):
    """The endpoint refused the request (an HTTP 4xx other than 429): a key, model or URL for the user to fix."""

    exit_code = exits.USER


class JudgeBudgetError(JudgeError):
    """The per-run request cap (``judge_max_requests``) is reached; the verdicts obtained are in the cache. The
    user decides whether to spend more: never restarted by itself."""

    exit_code = exits.USER


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date (``None``: absent or
    unreadable; a date in the past is 0)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Judge:
    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, cache_path: str | None = None, seed: int = 0,
                 template: str = TEMPLATE, concurrency: int = 8, max_requests: int = 0, max_wait: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url {url!r} must start with http:// or https://")
        if concurrency < 1 or max_requests < 0:
            raise ValueError(f"need concurrency >= 1 and max_requests >= 0, got {concurrency} and {max_requests}")
        self.url, self.model, self.api_key = url, model, api_key
        self.timeout, self.retries, self.backoff, self.seed, self.template = timeout, retries, backoff, seed, template
        self.concurrency, self.max_requests, self.max_wait = concurrency, max_requests, max_wait
        self.cache_path = cache_path
        self.cache: dict[str, str] = self._load_cache(cache_path)
        self._cut = _ends_cut(cache_path)  # a killed run's half line: the next verdict starts a new line
        self.requests_sent = 0
        self._lock = threading.Lock()  # guards cache, requests_sent and the cache file
        self._jitter = random.Random()  # its own generator: the global one may be seeded for other ends

    @staticmethod
    def _load_cache(path: str | None) -> dict[str, str]:
        """The cached verdicts; a line cut short by a killed run is skipped."""
        cache: dict[str, str] = {}
        if not path or not os.path.isfile(path):
            return cache
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    cache[entry["key"]] = entry["verdict"]
                except (ValueError, KeyError, TypeError):
                    log.warning("judge cache %s: line %d is not a verdict (cut short?); skipped", path, number)
        return cache

    def compare(self, prompt, a: str, b: str) -> float:
        """1.0 if ``a`` is preferred over ``b``, 0.0 if ``b`` is, 0.5 for a tie."""
        return float(self.compare_many([(prompt, a, b)], announce=False)[0])

    def compare_many(self, comparisons, *, announce: bool = True, as_given: bool = False) -> np.ndarray:
        """``compare`` for each ``(prompt, a, b)``, in input order, with up to ``concurrency`` requests at once;
        identical comparisons are requested once. ``announce``: log the request count first. ``as_given``: show
        ``a`` as response A always, instead of the seeded order (a caller that asks both orders itself)."""
        jobs = [self._job(*c, as_given=as_given) for c in comparisons]
        pending = {key: body for key, body, _ in jobs if key not in self.cache}
        if jobs and announce:
            cached = sum(key in self.cache for key, _, _ in jobs)
            log.info("judge: %d comparisons to request (%d cached) with %d in flight", len(pending), cached,
                     min(self.concurrency, len(pending)))
        if pending:
            self._request_all(pending)
        out = np.empty(len(jobs), np.float32)
        for i, (key, _, swap) in enumerate(jobs):
            verdict = self.cache[key]
            out[i] = 0.5 if verdict == "tie" else float((verdict == "a") != swap)
        return out

    def _job(self, prompt, a: str, b: str, *, as_given: bool = False) -> tuple[str, dict, bool]:
        """``(cache key, request body, swapped)``: B shown first when the comparison's own seed says so (never
        ``as_given``)."""
        swap = not as_given and random.Random(f"{self.seed}|{prompt}|{a}|{b}").random() < 0.5
        first, second = (b, a) if swap else (a, b)
        text = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in conversation(prompt))
        body = {"model": self.model, "temperature": 0.0, "messages": [
            {"role": "user", "content": self.template.format(conversation=text, a=first, b=second)}]}
        key = hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()
        return key, body, swap

    def _request_all(self, pending: dict[str, dict]) -> None:
        """Fetch each verdict into the cache from a pool of ``concurrency`` threads. On the first failure no
        new request starts, those in flight finish (into the cache), and the failure of the earliest input is
        raised."""
        stop = threading.Event()
        pool = cf.ThreadPoolExecutor(max_workers=min(self.concurrency, len(pending)), thread_name_prefix="judge")
        try:
            futures = [pool.submit(self._verdict, key, body, stop) for key, body in pending.items()]
            cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        finally:
            stop.set()  # after a failure (or KeyboardInterrupt): nothing new starts, sleeping retries end
            pool.shutdown(wait=True, cancel_futures=True)
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        errors = [e for e in errors if not isinstance(e, _Stopped)]
        if errors:
            raise errors[0]

    def _verdict(self, key: str, body: dict, stop: threading.Event) -> str:
        """One comparison's verdict from the endpoint (``a``, ``b`` or ``tie``), retried as the module says."""
        problem = ""
        for attempt in range(self.retries + 1):
            if stop.is_set():
                raise _Stopped()
            self._reserve()
            try:
                content = self._post(body)
            except _Retryable as err:
                problem, wait = str(err), err.wait
            else:
                match = _VERDICT.findall(content)
                if match:
                    return self._remember(key, match[-1].lower())
                problem = f"the answer names no verdict ('Preferred: A/B/Tie'): {content[-200:]!r}"
                wait = None
            if attempt < self.retries:
                delay = self.backoff * 2 ** attempt * (0.5 + self._jitter.random()) if wait is None else wait
                if stop.wait(min(delay, self.max_wait)):
                    raise _Stopped()
        raise JudgeError(f"judge at {self.url} gave no verdict after {self.retries + 1} attempts; last problem: "
                         f"{problem}")

    def _reserve(self) -> None:
        """Count one request against ``max_requests``, or raise when the cap is reached."""
        with self._lock:
            if self.max_requests and self.requests_sent >= self.max_requests:
                raise JudgeBudgetError(
                    f"judge_max_requests={self.max_requests} reached: this run sent {self.requests_sent} requests to "
                    f"{self.url}; every verdict obtained is in the cache ({len(self.cache)} in "
                    f"{self.cache_path or 'memory only'}). Raise judge_max_requests (0 = no cap) and rerun: "
                    f"it continues from the cache")
            self.requests_sent += 1

    def _remember(self, key: str, verdict: str) -> str:
        with self._lock:
            self.cache[key] = verdict
            if self.cache_path:
                with open(self.cache_path, "a") as f:
                    f.write("\n" if self._cut else "")
                    self._cut = False
                    f.write(json.dumps({"key": key, "verdict": verdict}) + "\n")
                    f.flush()
        return verdict

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 429 or err.code >= 500:
                wait = retry_after(err.headers.get("Retry-After")) if err.code in (429, 503) else None
                raise _Retryable(f"HTTP {err.code}", wait) from None
            raise JudgeRefused(f"judge at {self.url} refused the request: HTTP {err.code} "
                             f"{err.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise _Retryable(f"no answer within {self.timeout} s or connection failed ({err})") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"malformed response body (not chat-completions JSON): {raw[:200]!r}") from None

    # -- the annotator interface: each host judges its own rows; a failure on one host (out of retries, a refused
    # request, the request cap) ends every host with the same error instead of leaving them in the loop's next
    # collective.
    def __call__(self, prompts, responses) -> np.ndarray:
        """Scores for the loop's sample pairs: rows 2i and 2i+1 share a prompt and are compared with each other."""
        return distributed.agreed(self._pair_scores, prompts, responses)

    def win_scores(self, prompts, responses, references) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, reference_scores)`` for a win rate: each response judged against its reference."""
        prefs = distributed.agreed(self.compare_many, list(zip(prompts, responses, references)))
        return prefs, 1.0 - prefs

    def _pair_scores(self, prompts, responses) -> np.ndarray:
        if len(prompts) != len(responses) or len(responses) % 2:
            raise ValueError(f"the judge scores pairs: need an even, equal number of prompts and responses, got "
                             f"{len(prompts)} and {len(responses)}")
        prefs = self.compare_many([(prompts[i], responses[i], responses[i + 1]) for i in range(0, len(responses), 2)])
        scores = np.zeros(len(responses), np.float32)
        scores[0::2], scores[1::2] = prefs, 1.0 - prefs
        return scores


def _ends_cut(path: str | None) -> bool:
    """Whether the file at ``path`` exists, is not empty and does not end with a newline."""
    if not path or not os.path.isfile(path) or not os.path.getsize(path):
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class _Retryable(Exception):
    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait  # seconds the server asked for (Retry-After), else None: back off


class _Stopped(Exception):
    """Another request of the same call failed: this one starts nothing new."""
