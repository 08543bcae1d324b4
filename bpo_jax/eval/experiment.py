"""A grid of train runs, method × loss × seed, under one budget — the experiment behind the paper's claim:

  1. read the grid: ``base`` (the shared train config: keys, a config file, or both; see ``_base``), ``methods``
     (a name and the few keys a method may set), ``loss_types``, ``seeds``, ``out_dir``, and optionally ``only``
     (loss type -> the methods it runs with, when not all of them) and ``stages`` (lists of methods run one list
     after another, each over every loss and seed, so a half-finished grid has the first list on every seed);
     build every run's ``TrainConfig`` and refuse a method that changes the budget (T, batch size, test prompts,
     token limits, ...) or a finished run whose saved config differs;
  2. for each run in turn, ``run_dir = <out_dir>/<method>/<loss>/seed<k>``: skip it when it is finished, else run
     the same ``train`` command (which resumes from the run's checkpoint; its final evaluation writes the
     per-prompt scores), then ``evaluate`` the final checkpoint only if those scores are still missing; a
     failing run is logged and the grid goes on. The step-0 evaluation (the SFT model, the same for every
     method and loss of a seed: they share everything else) is made by the seed's first run and copied into
     the metrics of the others, which then skip it (``train`` reuses a logged step-0 result made on the same
     test set);
  3. read each finished run's per-prompt outcomes (1 when the greedy response beats the human reference
     strictly, as the paper counts it: a tie loses) and its win rate against step;
  4. summarise (``bpo_jax.eval.stats``): per (method, loss) the seeds' win rates with bootstrap CIs and their
     mean ± std, and for each pair of methods the paired win-rate difference with a bootstrap CI over prompts
     and seeds, and the two head to head (whose final response scores higher, prompt by prompt), with the same
     CI on P(A wins) − P(B wins);
  5. write them (``bpo_jax.cli.experiment``: ``results.csv``, ``paired.csv``, ``results.md``, ``win_rate.png``).

The runner takes its dependencies as arguments: ``run_command(args, log_path) -> exit code`` runs one
``python -m bpo_jax <args>`` (a subprocess per run in the CLI: bounded memory, isolated failures); progress goes to
this module's logger. The statistics are pure NumPy functions (``bpo_jax.eval.stats``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Callable, NamedTuple

import numpy as np
import yaml

from bpo_jax.config import KEY_GROUP, ConfigError, TrainConfig, load_config, run_identity_changes
from bpo_jax.eval.stats import (
    PairedDiff,
    SeedSummary,
    head_to_head,
    head_to_head_outcomes,
    outcomes,
    paired_bootstrap,
    summarize_seeds,
)
from bpo_jax.runtime.run_dir import JsonlLog, read_jsonl

log = logging.getLogger(__name__)

# What a method may set: how often π_β is refreshed and what the loss's reference is (plus the references' own
# knobs). Everything else is the shared budget and setting, in ``base``.
METHOD_KEYS = ("num_phases", "reference", "ema_rate", "mixup_alpha", "mixup_every", "reference_path",
               "ensemble_size")  # an ensemble of N adapters trains on the same pairs (the paper's stability claim)
GRID_KEYS = ("loss_type", "seed", "run_dir")  # set by the runner for each run
EXPERIMENT_KEYS = ("base", "methods", "loss_types", "seeds", "out_dir")
OPTIONAL_KEYS = ("only", "stages")


@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    loss_type: str
    seed: int
    config: TrainConfig
    overrides: tuple  # key=value strings, on top of config_file
    config_file: str | None = None  # base's config file, as the experiment names it

    @property
    def run_dir(self) -> str:
        return self.config.run_dir

    @property
    def train_args(self) -> tuple:
        """What ``python -m bpo_jax train`` gets: ``--config <file>`` (when base names one), then the overrides."""
        return (("--config", self.config_file) if self.config_file else ()) + self.overrides


@dataclasses.dataclass(frozen=True)
class Experiment:
    methods: dict  # name -> the method's overrides (after resolving num_phases: T)
    loss_types: tuple
    seeds: tuple
    out_dir: str
    runs: tuple  # Run, in the order they run: stage, then loss, then seed, then method (a half-finished grid
                 # compares every method of the first stage and loss on its first seeds)


def load_experiment(path: str, out_dir: str | None = None) -> Experiment:
    """Read and check an experiment YAML (step 1); ``out_dir`` overrides the file's. Raises ConfigError."""
    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"experiment file {path!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"experiment file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"experiment file {path!r} must hold a mapping with keys {', '.join(EXPERIMENT_KEYS)}")
    if out_dir:
        spec["out_dir"] = out_dir
    return build_experiment(spec, source=path)


def build_experiment(spec: dict, source: str = "the experiment") -> Experiment:
    """Every run's config from ``spec``; refuses unknown keys, a method that changes the budget, and a grid
    whose runs would not all start (e.g. T not a multiple of a method's F)."""
    unknown = sorted(set(spec) - set(EXPERIMENT_KEYS) - set(OPTIONAL_KEYS))
    missing = [k for k in EXPERIMENT_KEYS if k not in spec]
    if unknown or missing:
        raise ConfigError(f"{source}: " + "; ".join(
            ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])) +
            f" (an experiment has {', '.join(EXPERIMENT_KEYS)})")
    base_file, base = _base(spec["base"], source)
    methods, loss_types, seeds = spec["methods"], spec["loss_types"], spec["seeds"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{source}: methods must be a non-empty mapping of name -> overrides")
    if not (isinstance(loss_types, list) and loss_types and all(isinstance(x, str) for x in loss_types)):
        raise ConfigError(f"{source}: loss_types must be a non-empty list of names, e.g. [sigmoid, ipo, hinge]")
    if not (isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(loss_types)) < len(loss_types) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{source}: loss_types and seeds must not repeat")
    try:
        base_cfg = load_config(base_file, [_kv(k, v) for k, v in base.items()])
    except ConfigError as err:
        raise ConfigError(f"{source}: base: {err}") from None
    resolved = {}
    for name, over in methods.items():
        over = over or {}
        if not isinstance(over, dict) or "/" in str(name):
            raise ConfigError(f"{source}: method {name!r} must be a name (no '/') with a mapping of overrides")
        bad = sorted(set(over) - set(METHOD_KEYS))
        if bad:
            raise ConfigError(
                f"{source}: method {name!r} sets {', '.join(f'{k}={over[k]!r}' for k in bad)}; every method must "
                f"run under the same budget (total_steps, batch_size, eval_size, max_new_tokens, ...) and setting, "
                f"so those belong in base. A method may set only: {', '.join(METHOD_KEYS)}")
        resolved[name] = {k: base_cfg.total_steps if (k == "num_phases" and v == "T") else v for k, v in over.items()}
    only = _only(spec.get("only"), loss_types, resolved, source)
    runs = []
    for stage, loss, seed in itertools.product(_stages(spec.get("stages"), resolved, source), loss_types, seeds):
        for name in stage:
            if name not in only.get(loss, resolved):
                continue
            runs.append(_run(spec, base_file, base, name, resolved[name], loss, seed, source))
    check_same_budget(runs)
    return Experiment(resolved, tuple(loss_types), tuple(seeds), spec["out_dir"], tuple(runs))


def _base(base, source) -> tuple:
    """``base`` as ``(config file or None, {key: value})``, in one of three forms:

    * a mapping of flat train-config keys;
    * the path of a train-config file, e.g. ``base: configs/tldr_gemma2b.yaml`` (a paper config);
    * a mapping whose ``config`` key names such a file and whose other keys override it, e.g.
      ``base: {config: configs/tldr_gemma2b.yaml, total_steps: 64, eval_size: 200}``.

    A relative path is read from the current directory, as every other path of a run (``data_dir``, ``out_dir``)
    is, not from the experiment file's folder; a missing file is an error naming it. The file may set the grid's
    keys (a paper config sets ``loss_type`` and ``run_dir``): the grid overrides them, as the methods' keys
    override the file's. The mapping itself may not: there they would only be overridden."""
    base = {"config": base} if isinstance(base, str) else {} if base is None else base
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: base must be a config file's path or a mapping of train-config keys "
                          f"(optionally with config: <file>), got {base!r}")
    keys = {k: v for k, v in base.items() if k != "config"}
    path = base.get("config")
    if path is not None and not (isinstance(path, str) and path):
        raise ConfigError(f"{source}: base config must be the path of a train-config file, got {path!r}")
    if path is not None and "://" not in path and not os.path.isfile(path):
        raise ConfigError(f"{source}: base config file {path!r} does not exist (a relative path is read from the "
                          f"current directory, {os.getcwd()})")
    if fixed := [k for k in GRID_KEYS if k in keys]:
        raise ConfigError(f"{source}: base sets {fixed}; the grid sets them (loss_types, seeds, out_dir)")
    return path, keys


def _run(spec, base_file, base, name, over, loss, seed, source) -> Run:
    """One grid cell's ``Run``: base (its file, then its keys) + the method's overrides + the grid's keys."""
    run_dir = os.path.join(spec["out_dir"], name, loss, f"seed{seed}")
    overrides = tuple(_kv(k, v) for k, v in {**base, **over, "loss_type": loss, "seed": seed,
                                              "run_dir": run_dir}.items())
    try:
        cfg = load_config(base_file, overrides)
    except ConfigError as err:
        raise ConfigError(f"{source}: method {name!r} with loss_type={loss}: {err}") from None
    return Run(name, loss, seed, cfg, overrides, base_file)


def _stages(stages, methods, source) -> list:
    """``stages``: lists of methods, each method in exactly one; default: one stage of every method."""
    if stages is None:
        return [list(methods)]
    flat = [n for st in stages for n in st] if isinstance(stages, list) and all(
        isinstance(st, list) and st for st in stages) else None
    if flat is None or sorted(flat) != sorted(methods):
        raise ConfigError(f"{source}: stages must be lists of methods that name each of {list(methods)} once, "
                          f"got {stages!r}")
    return stages



def _only(only, loss_types, methods, source) -> dict:
    """``only``: loss type -> the methods run with it (a loss not named runs with every method)."""
    if only is None:
        return {}
    if not isinstance(only, dict):
        raise ConfigError(f"{source}: only must map a loss type to a list of methods, e.g. {{ipo: [offline, bpo_f2]}}")
    for loss, names in only.items():
        if loss not in loss_types:
            raise ConfigError(f"{source}: only names loss {loss!r}, which is not in loss_types {list(loss_types)}")
        if not (isinstance(names, list) and names and all(n in methods for n in names)):
            raise ConfigError(f"{source}: only.{loss} must be a non-empty list of methods from {list(methods)}, "
                              f"got {names!r}")
    return {loss: set(names) for loss, names in only.items()}


def check_same_budget(runs) -> None:
    """Every run's config equal to the first's except in METHOD_KEYS and GRID_KEYS (defensive: the overrides
    allowed make this so)."""
    free = set(METHOD_KEYS) | set(GRID_KEYS)
    first = runs[0]
    for run in runs[1:]:
        diff = [k for k in KEY_GROUP if k not in free and getattr(run.config, k) != getattr(first.config, k)]
        if diff:
            raise ConfigError(f"runs {first.method} and {run.method} differ in {diff}: not the same budget")


def check_finished_runs_match(exp: Experiment) -> None:
    """Refuse (before anything runs) a run directory holding a run started with other settings: a finished run
    would otherwise be skipped and reported under the new settings."""
    for run in exp.runs:
        saved = os.path.join(run.run_dir, "config.yaml")
        if os.path.exists(saved):
            changes = run_identity_changes(load_config(saved), run.config)
            if changes:
                raise ConfigError(f"{run.run_dir} holds a run with other settings:\n  " + "\n  ".join(changes) +
                                  "\nRestore the experiment's settings, or pass another out_dir")


def _kv(key, value) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"{key}={value}"


# ---- step 2: the runs ----------------------------------------------------------------------------------------

def eval_file(run: Run) -> str:
    """Where ``train`` (at its final evaluation) and ``evaluate`` write the final model's per-prompt scores."""
    from bpo_jax.eval.win_rate import scores_file

    return str(scores_file(run.run_dir, run.config.total_steps, run.config.data))


def is_trained(run: Run) -> bool:
    """``metrics.jsonl`` holds the final record (train logs it last)."""
    return any(r.get("final") and r.get("step") == run.config.total_steps
               for r in read_jsonl(os.path.join(run.run_dir, "metrics.jsonl")))


def run_grid(exp: Experiment, run_command: Callable[[list, str], int]) -> list:
    """Step 2: train and evaluate each unfinished run in turn. Returns the runs that failed, with their step and
    exit code."""
    check_finished_runs_match(exp)
    failed = []
    for i, run in enumerate(exp.runs, 1):
        name = f"[{i}/{len(exp.runs)}] {run.method}/{run.loss_type}/seed{run.seed}"
        trained, evaluated = is_trained(run), os.path.exists(eval_file(run))
        if trained and evaluated:
            log.info(f"{name}: finished, skipped")
            continue
        os.makedirs(run.run_dir, exist_ok=True)
        if not trained and (donor := reuse_step0_eval(exp, run)):
            log.info(f"{name}: the step-0 evaluation (the SFT model) is {donor}'s")
        log_path = os.path.join(run.run_dir, "experiment.log")
        commands = ([] if trained else [["train", *run.train_args]]) + [
            ["evaluate", "--checkpoint", run.run_dir, "--step", str(run.config.total_steps)]]
        for args in commands:
            if args[0] == "evaluate" and os.path.exists(eval_file(run)):
                break  # train's final evaluation wrote the per-prompt scores: no second evaluation
            t0 = time.time()
            log.info(f"{name}: python -m bpo_jax {' '.join(args)}")
            rc = run_command(args, log_path)
            log.info(f"{name}: {args[0]} {'done' if rc == 0 else f'FAILED (exit {rc}; see {log_path})'} "
                f"in {time.time() - t0:.0f} s")
            if rc != 0:
                failed.append((run, args[0], rc))
                break
    return failed


def _step0_evals(run_dir: str) -> list:
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("step") == 0 and "eval/win_rate" in r]


def reuse_step0_eval(exp: Experiment, run: Run) -> str | None:
    """Copy the step-0 evaluation of another run of ``run``'s seed into ``run``'s metrics (when it has none), so
    its ``train`` skips evaluating the SFT model again; returns the donor's run_dir, or None. The runs of a seed
    differ only in METHOD_KEYS and the loss (``check_same_budget``), none of which changes the step-0 model."""
    if _step0_evals(run.run_dir):
        return None
    for other in exp.runs:
        if other.seed == run.seed and other is not run and (records := _step0_evals(other.run_dir)):
            JsonlLog(os.path.join(run.run_dir, "metrics.jsonl")).append({**records[-1], "reused_from": other.run_dir})
            return other.run_dir
    return None


# ---- step 3: per-prompt outcomes and curves -------------------------------------------------------------------

def read_scores(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The final checkpoint's ``(scores, reference_scores)`` per test prompt."""
    rows = read_jsonl(eval_file(run))
    return (np.asarray([r["score"] for r in rows], np.float64),
            np.asarray([r["reference_score"] for r in rows], np.float64))


def win_rate_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, win_rates)`` from the run's ``metrics.jsonl`` (step 0, every ``eval_every``, the final)."""
    from bpo_jax.eval.plot import load_series

    s = load_series(run.run_dir)
    return s["eval_step"], s["win_rate"]


class RunDrift(NamedTuple):
    """How far a run's policy moved and what its pairs looked like, from its ``metrics.jsonl``."""
    eval_steps: tuple  # the evaluated steps after step 0, in order
    win_rate: tuple  # per evaluated step
    sft_logratio: tuple  # per evaluated step: log π_θ/π_SFT of the greedy responses (nan when not logged)
    mean_score: tuple  # per evaluated step: the greedy responses' mean gold score
    reward_accuracy: tuple  # mean ``rewards/accuracies`` over steps 1..T/2 and T/2+1..T; with the behavior
    # reference only over the steps that start no phase (nan: none, as with F = T): there π_θ = π_β, h = 0 up to
    # rounding and the accuracy is rounding noise
    tied_dropped: int  # pairs the annotator scored equal, dropped and resampled, over the run
    identical_dropped: int  # pairs of two identical samples, dropped and resampled
    prompts_sampled: int  # prompts π_β sampled over the run (the trained pairs plus the dropped ones)


def run_drift(run: Run) -> RunDrift:
    """The run's :class:`RunDrift`; a resumed run may log a step twice: the last record of a step wins."""
    by_step: dict = {}
    for rec in read_jsonl(os.path.join(run.run_dir, "metrics.jsonl")):
        by_step.setdefault(rec["step"], {}).update(rec)
    evals = [s for s in sorted(by_step) if s > 0 and "eval/win_rate" in by_step[s]]
    half, k = run.config.total_steps // 2, run.config.steps_per_phase

    def phase_start(s, r):  # where h = 0: the flag the runs log (derived from K for older runs), behavior ref. only
        return run.config.reference == "behavior" and bool(r.get("phase_start", (s - 1) % k == 0))

    acc = [[r["rewards/accuracies"] for s, r in by_step.items()
            if lo < s <= hi and "rewards/accuracies" in r and not phase_start(s, r)]
           for lo, hi in ((0, half), (half, run.config.total_steps))]

    def total(key):
        return int(sum(r.get(key, 0) for r in by_step.values()))

    return RunDrift(tuple(evals), tuple(by_step[s]["eval/win_rate"] for s in evals),
                    tuple(by_step[s].get("eval/sft_logratio", float("nan")) for s in evals),
                    tuple(by_step[s]["eval/mean_score"] for s in evals),
                    tuple(float(np.mean(a)) if a else float("nan") for a in acc),
                    total("phase/tied_pairs_dropped"), total("phase/identical_pairs_dropped"),
                    total("phase/prompts_sampled"))


class FinalResponses(NamedTuple):
    """What the final policy's greedy responses look like, from the run's per-prompt file: a policy that answers
    many prompts with one text (collapse) or writes longer than the references can win on a length-rewarding
    scorer without summarising better."""
    distinct: float  # distinct response texts / test prompts (1: no two prompts get the same text)
    words: float  # mean words per response (whitespace-split)
    reference_words: float  # the same for the human references
    truncated: float  # the share cut off at eval_max_new_tokens (nan: a file written before it was recorded)


def final_responses(run: Run) -> FinalResponses:
    """The run's :class:`FinalResponses` (its final evaluation's ``eval_file``)."""
    from bpo_jax.eval.win_rate import response_shares

    rows = read_jsonl(eval_file(run))
    texts = [r["response"] for r in rows]
    cut = [r["truncated"] for r in rows if "truncated" in r]
    return FinalResponses(response_shares(texts)[0], float(np.mean([len(t.split()) for t in texts])),
                          float(np.mean([len(r["reference"].split()) for r in rows])),
                          float(np.mean(cut)) if len(cut) == len(rows) else float("nan"))


# ---- step 4: the summary ------------------------------------------------------------------------------------

class MethodResult(NamedTuple):
    method: str
    loss_type: str
    seeds: tuple  # the finished seeds
    per_seed: tuple  # bpo_jax.eval.win_rate.WinRate per finished seed (bootstrap CIs over prompts, and groups)
    summary: SeedSummary  # mean ± std of the seeds' win rates
    by_group: dict | None = None  # group -> win rate over the finished seeds' prompts of that group


class MethodPair(NamedTuple):
    """Two methods of one loss type compared on the seeds both finished, the same test prompts."""
    loss_type: str
    method_a: str
    method_b: str
    vs_references: PairedDiff  # A − B in win rate against the human references (ties lose)
    head_to_head: dict  # ``stats.head_to_head``: A's final responses against B's, by the higher gold score
    vs_references_grouped: PairedDiff | None = None  # the same, whole groups of prompts resampled
    head_to_head_grouped: dict | None = None


def read_groups(run: Run, prompt_groups: dict) -> list:
    """The group of each prompt in the run's per-prompt file, from ``prompt_groups`` (prompt text -> group: the
    test set's, ``bpo_jax.wiring.tasks.prompt_groups``); a prompt the test set does not hold is an error."""
    groups = []
    for n, row in enumerate(read_jsonl(eval_file(run)), 1):
        if row["prompt"] not in prompt_groups:
            raise ValueError(f"{eval_file(run)}:{n}: a prompt that {run.config.data}'s test set does not hold "
                             f"(was the test set changed after the run?): {row['prompt'][:80]!r}")
        groups.append(prompt_groups[row["prompt"]])
    return groups


def summarize(exp: Experiment, prompt_groups: dict | None = None, **bootstrap_kw) -> tuple[list, list, list]:
    """Steps 3–4 over the finished runs: ``(results, pairs, unfinished)``; ``results`` has a MethodResult per
    (method, loss) with a finished seed, ``pairs`` a MethodPair per two methods of a loss with a common finished
    seed, ``unfinished`` the runs without per-prompt scores. ``prompt_groups`` (prompt text -> group, when the
    test set gives its prompts groups): each pair is also compared with whole groups resampled."""
    from bpo_jax.eval.win_rate import win_rate_from_scores

    results, pairs, unfinished, by_loss, groups = [], [], [], {}, None
    for method, loss in itertools.product(exp.methods, exp.loss_types):
        seeds, rates, scored = [], [], {}
        for run in (r for r in exp.runs if (r.method, r.loss_type) == (method, loss)):
            if not (is_trained(run) and os.path.exists(eval_file(run))):
                unfinished.append(run)
                continue
            scores, refs = read_scores(run)
            if prompt_groups is not None:
                run_groups = read_groups(run, prompt_groups)
                if groups is not None and run_groups != groups:
                    raise ValueError(f"{eval_file(run)}: its test prompts differ from the other runs'")
                groups = run_groups
            seeds.append(run.seed)
            rates.append(win_rate_from_scores(scores, refs, groups=groups))
            scored[run.seed] = (scores, refs)
        if seeds:
            results.append(MethodResult(method, loss, tuple(seeds), tuple(rates),
                                        summarize_seeds([w.win_rate for w in rates]),
                                        None if groups is None else win_rate_by_group(scored.values(), groups)))
            by_loss.setdefault(loss, {})[method] = scored
    for loss, methods in by_loss.items():
        for x, y in itertools.combinations(methods, 2):
            if common := [s for s in exp.seeds if s in methods[x] and s in methods[y]]:
                pairs.append(_method_pair(loss, x, y, [methods[x][s] for s in common],
                                          [methods[y][s] for s in common], groups, **bootstrap_kw))
    return results, pairs, unfinished


def win_rate_by_group(scored, groups: list) -> dict:
    """``{group: win rate}`` over every seed's prompts of each group (``scored``: per seed, ``(scores,
    reference_scores)``), in the order the groups first appear."""
    wins = np.stack([outcomes(*sr) for sr in scored])  # [seeds, prompts]
    labels = np.asarray(groups)
    return {g: float(wins[:, labels == g].mean()) for g in dict.fromkeys(groups)}


def _method_pair(loss: str, x: str, y: str, a: list, b: list, groups, **bootstrap_kw) -> MethodPair:
    """Methods ``x`` and ``y`` compared on their common seeds' ``(scores, reference_scores)``, ``a`` and ``b``."""
    vs_refs = [outcomes(*sa) for sa in a], [outcomes(*sb) for sb in b]
    h2h = [head_to_head_outcomes(sa[0], sb[0]) for sa, sb in zip(a, b)]
    pair = MethodPair(loss, x, y, paired_bootstrap(*vs_refs, **bootstrap_kw), head_to_head(h2h, **bootstrap_kw))
    if groups is None:
        return pair
    return pair._replace(vs_references_grouped=paired_bootstrap(*vs_refs, groups=groups, **bootstrap_kw),
                         head_to_head_grouped=head_to_head(h2h, groups=groups, **bootstrap_kw))
