"""Tests of the tests: no test's subprocess can be cut short by pytest's own limit.

A test that waits on ./check (or QEMU) longer than pytest lets it run is killed
first under load, leaving a red run whose cause is the harness, and possibly its
subprocess's mounts behind.  The limits are declared once (@waits_for in conftest)
and checked twice: statically here, for every test in tests/, and at each call of
the check fixture.
"""

import ast
import glob
import os

import pytest

import conftest
from conftest import CHECK_LIMIT, MARGIN, CheckRunner, LimitError

INI_LIMIT = 300  # pytest.ini's timeout


def _constants(tree):
    """The numbers a test module names: its own and conftest's."""
    named = {k: v for k, v in vars(conftest).items() if isinstance(v, int)}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and len(node.targets) == 1:
            named[getattr(node.targets[0], "id", "")] = node.value.value
    return named


def _value(node, named):
    """A number written in a test: a literal or a name."""
    return node.value if isinstance(node, ast.Constant) else named[node.id]


def _declared_limit(function, module_limit, named):
    for decorator in function.decorator_list:
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "waits_for":
            return sum(_value(a, named) for a in decorator.args) + MARGIN
    return module_limit


def _module_limit(tree, named):
    """pytestmark = pytest.mark.timeout(N), or pytest.ini's limit."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "pytestmark"
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", None) == "timeout"):
            return _value(node.value.args[0], named)
    return INI_LIMIT


def _subprocess_limits(node, named):
    """The limits a test gives what it waits on: timeout= of each call, and the check
    fixture's default for a check(...) call without one; a loop over a literal tuple or
    list waits once per item."""
    times = len(node.iter.elts) if isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)) else 1
    for child in ast.iter_child_nodes(node):
        for limit in _subprocess_limits(child, named):
            yield limit * times
    if isinstance(node, ast.Call):
        timeout = [k.value for k in node.keywords if k.arg == "timeout"]
        if timeout and isinstance(timeout[0], (ast.Constant, ast.Name)):
            yield _value(timeout[0], named)
        elif getattr(node.func, "id", None) == "check":
            yield CHECK_LIMIT


def test_every_test_waits_less_than_pytest_lets_it():
    short = []
    for path in sorted(glob.glob(os.path.join(conftest.ROOT, "tests", "test_*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read())
        named = _constants(tree)
        module_limit = _module_limit(tree, named)
        for function in tree.body:
            if isinstance(function, ast.FunctionDef) and function.name.startswith("test_"):
                waits = sum(_subprocess_limits(function, named))
                limit = _declared_limit(function, module_limit, named)
                if waits + MARGIN > limit:
                    short.append(f"{os.path.basename(path)}::{function.name} waits up to {waits} s, "
                                 f"pytest stops it at {limit} s")
    assert short == []


def test_the_check_fixture_refuses_limits_above_the_tests(tmp_path):
    runner = CheckRunner(tmp_path, str(tmp_path), limit=INI_LIMIT)
    with pytest.raises(LimitError, match="declare @waits_for"):
        runner.within_limit(900)
    runner = CheckRunner(tmp_path, str(tmp_path), limit=2 * CHECK_LIMIT + MARGIN)
    runner.within_limit(CHECK_LIMIT)
    runner.within_limit(CHECK_LIMIT)
    with pytest.raises(LimitError, match=f"{3 * CHECK_LIMIT} s in all"):
        runner.within_limit(CHECK_LIMIT)
