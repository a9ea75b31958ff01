"""ci/'s templates are valid YAML, lint-clean, and run the commands this project has."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

TEMPLATES = ["ci/github-actions.yml", "ci/gitlab-ci.yml"]
LINT_RULES = "{extends: default, rules: {line-length: {max: 130}, document-start: disable, truthy: disable}}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_yamllint_is_clean(template):
    done = subprocess.run([sys.executable, "-m", "yamllint", "-d", LINT_RULES, os.path.join(ROOT, template)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("template", TEMPLATES)
def test_commands_are_ones_this_project_takes(template):
    """Every ./check option the template uses exists; the merge and SRU jobs are there."""
    with open(os.path.join(ROOT, template)) as f:
        text = f.read()
    yaml.safe_load(text)
    help_text = subprocess.run([os.path.join(ROOT, "check"), "--help"], capture_output=True, text=True).stdout
    options = {o for line in text.splitlines() if "./check" in line for o in re.findall(r" (--[a-z-]+)", line)}
    assert options
    for option in options:
        assert option in help_text, option
    assert "harness.baseline merge" in text and "--shard" in text and "--kernel" in text and "--baseline" in text
