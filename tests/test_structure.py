"""The house rules a newcomer can rely on, checked: the package's shape (few top-level modules,
short functions, one module that talks MPI), and every option's choices come from the registry
of the parts they name (a new rule is one entry, never a second list to keep in step)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hpcfl import backends
from hpcfl.config import FIELDS, Config
from hpcfl.core import optim
from hpcfl.fl import aggregators, attacks, collectors, partition, server_opt
from hpcfl.parallel import sync
from hpcfl.privacy import server_attacks

PACKAGE = Path(__file__).resolve().parent.parent / "hpcfl"
MAX_FUNCTION_LINES = 60


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_at_most_ten_modules_at_the_top_and_the_rest_in_subpackages_by_concern():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == ["backends", "core", "data", "fl", "io", "parallel", "privacy", "runtime", "training"]
    for name in packages:                   # each says what its modules are for
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        listed = {p.stem for p in (PACKAGE / name).glob("*.py")} - {"__init__"}
        missing = [m for m in listed if f"{m}.py" not in doc]
        assert not missing, f"hpcfl/{name}/__init__.py does not describe {missing}"


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_only_comm_py_imports_mpi4py():
    importers = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mpi4py" or n.startswith("mpi4py.") for n in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert sorted(set(importers)) == ["parallel/comm.py"]


@pytest.mark.parametrize("option, registry", [
    ("optimizer", tuple(optim.OPTIMIZERS)),
    ("server_opt", tuple(server_opt.SERVER_OPTIMIZERS)),
    ("aggregator", tuple(aggregators.AGGREGATORS)),
    ("partition", tuple(partition.PARTITIONS)),
    ("allreduce", tuple(sync.SYNCS)),
    ("backend", ("auto", *backends.NAMES)),
    ("attack", attacks.KINDS),
    ("server_attack", server_attacks.ATTACKS),
])
def test_every_option_takes_its_choices_from_the_registry_of_its_parts(option, registry):
    assert FIELDS[option].metadata["choices"] == registry


def test_each_registered_part_is_built_from_the_settings_that_name_it():
    n = 7
    for name, cls in server_opt.SERVER_OPTIMIZERS.items():
        made = server_opt.create(Config(mode="fl", server_opt=name), n)
        assert type(made) is cls and made.state_vectors == len(made.state())
    be = backends.get("numpy")
    for name in optim.OPTIMIZERS:
        opt = optim.create(name, be, n, 0.9, 0.0)
        assert opt.state_vectors == sum(1 for v in opt.state().values() if not isinstance(v, int))
    # the rules that need every update at the server are exactly the ones the gathering collector
    # serves; the weighted sums go through the Reduce
    gathered = {name for name, rule in aggregators.AGGREGATORS.items() if rule.gathered}
    assert gathered == {"median", "trimmed-mean", "krum", "multi-krum"}
    for name in aggregators.AGGREGATORS:
        kind = collectors.kind(Config(mode="fl", aggregator=name, max_update_norm=1.0), None)
        assert kind == ("gathered" if name in gathered else "plain")
    assert collectors.kind(Config(mode="fl", secure_agg=True), None) == "secure"
    assert set(collectors.COLLECTORS) == {"plain", "gathered", "central-dp", "secure"}
