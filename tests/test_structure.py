"""The house rules a newcomer can rely on, checked: the package's shape (few top-level modules,
short functions, one module that talks MPI), and every option's choices come from the registry
of the parts they name (a new rule is one entry, never a second list to keep in step)."""
from __future__ import annotations

import ast
import sys
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


def test_the_protocol_tables_code_lines_lie_in_the_functions_they_name():
    # benchmarks/PRIVACY.md maps each step of the protocol to `path:line` (Function): kept true
    # when code moves
    import re

    text = (PACKAGE.parent / "benchmarks" / "PRIVACY.md").read_text()
    table = text.split("## Secure aggregation: the protocol, step by step", 1)[1].split("\n## ", 1)[0]
    refs = re.findall(r"`(hpcfl/[\w/]+\.py):(\d+)` \(([\w.]+)\)", table)
    assert len(refs) >= 20, refs
    for path, line, name in refs:
        tree = ast.parse((PACKAGE.parent / path).read_text())
        spans = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        spans[f"{node.name}.{item.name}"] = (item.lineno, item.end_lineno)
            elif isinstance(node, ast.FunctionDef):
                spans.setdefault(node.name, (node.lineno, node.end_lineno))
        assert name in spans, f"{path}: no function {name}"
        lo, hi = spans[name]
        assert lo <= int(line) <= hi, f"{path}:{line} is not in {name} (lines {lo}-{hi})"
    defined = {m for p in (PACKAGE.parent / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    named = set(re.findall(r"`(test_\w+)", table))
    assert named and not named - defined, named - defined


def test_every_listed_mutant_still_applies_to_the_code():
    # benchmarks/mutants.py's mutants name the exact text they change: when code moves, this
    # fails, rather than the mutation check silently testing nothing
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutants", PACKAGE.parent / "benchmarks" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants              # (dataclasses look their module up)
    spec.loader.exec_module(mutants)
    assert len(mutants.MUTANTS) >= 9
    assert [why for m in mutants.MUTANTS if (why := mutants.check_applicable(m))] == []
    for m in mutants.MUTANTS:                 # the tests named exist
        for node in m.tests:
            path, name = node.split("::")
            assert f"def {name}(" in (PACKAGE.parent / path).read_text(), node
