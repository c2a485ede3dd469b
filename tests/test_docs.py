"""The README's promises about itself: the Quickstart's lines are what CI runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def quickstart_lines(readme):
    """The command lines of the first ```bash block under '## Quickstart', trailing comments removed."""
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_quickstart_is_two_self_contained_lines():
    setup_and_train, tests = quickstart_lines(read("README.md"))
    assert setup_and_train == "pip install -r requirements.txt && python train.py"
    assert tests == "pip install -r requirements-dev.txt && python -m pytest"


def test_dev_requirements_pull_in_the_runtime_ones():
    lines = [line.strip() for line in read("requirements-dev.txt").splitlines()]
    first = next(line for line in lines if line and not line.startswith("#"))
    assert first == "-r requirements.txt"


def test_ci_runs_the_quickstart_test_line_last():
    tests = quickstart_lines(read("README.md"))[-1]
    commands = [line.strip() for line in read(".ci", "run").splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1] == tests
    assert "set -euo pipefail" in commands  # a failing (or empty, exit 5) pytest fails CI
