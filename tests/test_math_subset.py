"""`python -m pytest -m math` selects the fast checks of the method's formulas, one area each: the tests of
those areas carry the `math` marker (registered in pytest.ini) and none of them is left out."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Area -> (test file, a word every one of its test names would hold, "" for any test of the file).
AREAS = {
    "OT": ("tests/test_ot.py", ""),
    "projection": ("tests/test_advantage.py", "projection"),
    "advantage": ("tests/test_advantage.py", ""),
    "objective": ("tests/test_objective.py", ""),
    "reward": ("tests/test_reward.py", ""),
    "metrics": ("tests/test_metrics.py", ""),
}


def collected(files, *marker) -> list[str]:
    """The test ids pytest collects from `files`, with `-m <marker>` when given (collection only: nothing
    runs)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=",
           "-p", "no:cacheprovider", *(["-m", *marker] if marker else []), *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # 5: nothing selected
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_math_subset_covers_every_area():
    files = sorted({path for path, _ in AREAS.values()})
    ids = collected(files, "math")
    for area, (path, word) in AREAS.items():
        in_area = [i for i in ids if i.startswith(path + "::") and word in i.split("::")[1]]
        assert in_area, f"`pytest -m math` selects no {area} test ({path})"
    # every test of these files, so that a test added to one joins the subset
    assert ids == collected(files)
