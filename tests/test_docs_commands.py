"""The commands, paths and links in README.md and docs/*.md are real: every ``python -m bpo_jax`` command names a
subcommand that exists, config files that exist and config keys that exist; every launcher and bench script named
exists; every repo path named exists; every relative link (and its #anchor) points at something. Nothing runs and
nothing compiles: only the config modules are imported."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from bpo_jax.__main__ import COMMANDS
from bpo_jax.config import KEY_GROUP

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "config.md")]
OVERRIDE_COMMANDS = ("train", "sft", "evaluate", "compare")  # the subcommands that take key=value config overrides
# Paths the docs name on purpose though they are gone from the tree (each page says how to get them back).
HISTORICAL = {"bench/lora_step.py"}  # docs/benchmarks.md: `git show be6d3cc:bench/lora_step.py`
PATH_RE = re.compile(r"(?<![\w/.:~-])((?:launch|bench|configs|bpo_jax|tests|docs|data|\.ci)/[\w./{},<>*-]*"
                     r"\.(?:sh|py|yaml|json|md|png|jsonl|csv|txt))(?![\w/])")


def _rel(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def _expand(path: str) -> list[str]:
    """``configs/{tldr,hh}_gemma2b.yaml`` -> both names (one brace group)."""
    m = re.search(r"\{([^{}]*)\}", path)
    return [path[:m.start()] + alt + path[m.end():] for alt in m.group(1).split(",")] if m else [path]


def _placeholder(token: str) -> bool:
    return any(c in token for c in "<>*$") or "..." in token


def _code_commands(text: str) -> list[str]:
    """Shell commands of the ```bash / ```sh / ```console blocks, continuation lines joined, comments dropped,
    split at ``&&``, ``;`` and ``|``; plus the inline `...` spans that start with a command."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            line = re.sub(r"^\$ ", "", line)
            commands += [c.strip() for c in re.split(r"&&|;|\|", line) if c.strip()]
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(span.split())
        if re.match(r"(bash )?(launch/\S+\.sh|python (-m bpo_jax|bench/\S+\.py))\b", span):
            commands.append(span)
    return commands


def _tokens(command: str) -> list[str]:
    command = command.replace("[", " ").replace("]", " ")
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # leading environment assignments
        tokens.pop(0)
    return tokens


def _check_overrides(tokens: list[str], where: str) -> list[str]:
    """``key=value`` tokens must name config keys (flat or ``group.key``); a value after a ``--flag`` is the
    flag's; ``--config FILE`` must exist."""
    problems = []
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1] if i else ""
        if prev == "--config" and not _placeholder(tok) and not (ROOT / tok).is_file():
            problems.append(f"{where}: --config {tok} does not exist")
        if "=" not in tok or tok.startswith("-") or (prev.startswith("-") and "=" not in prev and prev != "--"):
            continue
        name = tok.split("=", 1)[0]
        if name in ("key", "KEY") or _placeholder(name):
            continue
        group, _, key = name.rpartition(".")
        if key not in KEY_GROUP or (group and KEY_GROUP[key] != group):
            problems.append(f"{where}: {tok!r} names no config key")
    return problems


def check_command(command: str, where: str) -> list[str]:
    tokens = _tokens(command)
    if tokens and tokens[0] == "bash":
        tokens = tokens[1:]
    if not tokens:
        return []
    problems = []
    if tokens[:3] == ["python", "-m", "bpo_jax"]:
        if len(tokens) < 4:
            return problems
        sub, args = tokens[3], tokens[4:]
        if _placeholder(sub):
            return problems
        if sub not in COMMANDS:
            return [f"{where}: python -m bpo_jax {sub}: no such subcommand ({', '.join(COMMANDS)})"]
        if sub in OVERRIDE_COMMANDS:
            problems += _check_overrides(args, where)
        if sub == "experiment" and args and not args[0].startswith("-") and not _placeholder(args[0]):
            if not (ROOT / args[0]).is_file():
                problems.append(f"{where}: experiment {args[0]} does not exist")
    elif re.match(r"(\./)?(launch|bench)/", tokens[0]) or (tokens[0] == "python" and len(tokens) > 1
                                                          and tokens[1].startswith("bench/")):
        script = tokens[0] if tokens[0] != "python" else tokens[1]
        args = tokens[tokens.index(script) + 1:]
        if not _placeholder(script) and script not in HISTORICAL and not (ROOT / script).is_file():
            problems.append(f"{where}: {script} does not exist")
        if script.endswith(("local.sh", "memory_plan.py", "online_loop.py", "sampling_layout.py")):
            problems += _check_overrides(args, where)
        elif script.endswith(("tpu_pod.sh", "slurm.sh")) and "--" in args:  # after --: train's arguments
            problems += _check_overrides(args[args.index("--") + 1:], where)
    elif tokens[0] == "source" and len(tokens) > 1 and not (ROOT / tokens[1]).is_file():
        problems.append(f"{where}: {tokens[1]} does not exist")
    return problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def check_page(page: pathlib.Path, text: str | None = None) -> list[str]:
    text = page.read_text() if text is None else text
    where = _rel(page)
    problems = []
    for command in _code_commands(text):
        problems += check_command(command, f"{where}: `{command[:80]}`")
    for path in set(PATH_RE.findall(text)):
        for one in _expand(path):
            if not _placeholder(one) and "{" not in one and one not in HISTORICAL and not (ROOT / one).exists():
                problems.append(f"{where}: {one} does not exist")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            problems.append(f"{where}: link ({target}) points at nothing")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: link ({target}): no heading with that anchor")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_docs_commands_paths_and_links_are_real(page):
    assert check_page(page) == []


def test_the_check_finds_what_is_broken():
    """Each kind of mistake is reported: a subcommand, a config file, a key, a script, a path, a link, an anchor."""
    readme = ROOT / "README.md"
    broken = """
```bash
python -m bpo_jax trian --config configs/smollm2_cpu_demo.yaml
python -m bpo_jax train --config configs/nope.yaml total_steps=4
bash launch/local.sh total_step=4
launch/tpu_pod.sh run -- --config configs/tldr_gemma2b.yaml loss.betta=0.1
python bench/nope.py
```
`python -m bpo_jax sft --config configs/smollm2_sft_cpu.yaml sft.beta=0.1` and bpo_jax/nope.py,
[a](docs/nope.md), [b](docs/training.md#no-such-heading).
"""
    problems = check_page(readme, broken)
    for needle in ("trian", "configs/nope.yaml", "total_step=4", "loss.betta", "bench/nope.py", "sft.beta",
                   "bpo_jax/nope.py", "(docs/nope.md)", "no-such-heading"):
        assert any(needle in p for p in problems), (needle, problems)
    fine = ("```bash\npython -m bpo_jax train --config configs/smollm2_cpu_demo.yaml loss.beta=0.2 "
            "[key=value ...]\n```\n")
    assert check_page(readme, fine) == []
