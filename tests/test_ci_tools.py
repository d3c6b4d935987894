"""A test that needs a missing tool is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import os

import pytest

from conftest import ROOT, find_tool

pytest_plugins = ["pytester"]

INNER_CONFTEST = f"""
import importlib.util
import sys

_spec = importlib.util.spec_from_file_location("medvlm_conftest", {str(ROOT / "tests" / "conftest.py")!r})
_module = sys.modules["medvlm_conftest"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
pytest_runtest_setup = _module.pytest_runtest_setup
"""

INNER_TESTS = """
import pytest

@pytest.mark.needs_tool("medvlm-no-such-tool", install="nowhere")
def test_needs_a_missing_tool():
    pass

@pytest.mark.needs_tool("python3")
def test_needs_a_present_tool():
    pass
"""


# under CI the missing tool fails the test's setup: an error, and the run fails
@pytest.mark.parametrize("ci, missing_is", [("", "skipped"), ("true", "errors")])
def test_a_missing_tool_skips_locally_and_fails_under_ci(pytester, monkeypatch, ci, missing_is):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'gen'}")
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(INNER_TESTS)
    pytester.makeini("[pytest]\nmarkers =\n    needs_tool: test\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-rsf")
    result.assert_outcomes(passed=1, **{missing_is: 1})
    result.stdout.fnmatch_lines(["*medvlm-no-such-tool not installed (nowhere)*"])


@pytest.mark.parametrize("tool", ["kubectl", "grpcurl", "hadolint", "buf"])
def test_the_tools_the_tests_need_are_installed_with_the_requirements(tool):
    """requirements/dev.txt installs each into the venv, so CI never depends on the machine image."""
    found = find_tool(tool)
    if found is None and not os.environ.get("CI"):
        pytest.skip(f"{tool} not installed here (pip install -r requirements/dev.txt)")
    assert found is not None, f"{tool} missing under CI"
