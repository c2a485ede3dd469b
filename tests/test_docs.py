"""The documents keep their promises: every `method.md §N` reference names a section that exists, no reference
points to a file the repository does not hold, and the README Quickstart's lines are what CI runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = os.path.join("docs", "method.md")
HEADING_RE = re.compile(r"^## §(\d+) \S", re.M)  # "## §7 Main advantage"
REF_RE = re.compile(r"§(\d+)")  # "§" marks a method.md section everywhere in the tree, ranges included
# Files that were never part of the repository; written split so that this file does not name them itself.
MISSING_FILES_RE = re.compile("PAPER" + r"\.md|" + "QWEN_VL" + "_NOTES|" + "METRICS" + r"\.md")
SKIP_DIRS = {"data", "runs", "__pycache__", "node_modules"}  # generated, never references


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def method_sections(text):
    """Section numbers of method.md, from its '## §N Title' headings, in document order."""
    return [int(n) for n in HEADING_RE.findall(text)]


def tree_files(root):
    """The .py, .md and .sh files under root, skipping hidden and generated folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith((".py", ".md", ".sh")):
                yield os.path.join(folder, name)


def bad_references(root, sections):
    """'path:line: §N' for every § reference under root whose section number is not in `sections`."""
    bad = []
    for path in tree_files(root):
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                for n in REF_RE.findall(line):
                    if int(n) not in sections:
                        bad.append(f"{os.path.relpath(path, root)}:{k}: §{n}")
    return bad


def test_method_sections_are_numbered_one_to_n_and_indexed():
    text = read(METHOD)
    sections = method_sections(text)
    assert sections == list(range(1, len(sections) + 1))
    # The index table at the top lists every section once, in order: "| 7 | main advantage ... |".
    assert [int(n) for n in re.findall(r"^\| (\d+) \|", text, re.M)] == sections


def test_method_covers_the_method():
    titles = " ".join(re.findall(r"^## §\d+ (.*)$", read(METHOD), re.M)).lower()
    for topic in ("prompt", "parser", "reward", "data families", "rendering", "expcot", "main advantage",
                  "ot cost", "marginals", "sinkhorn", "transport cost", "grounded reward", "grounded advantage",
                  "orthogonal projection", "fused advantage", "objective", "point-wise", "affiliation",
                  "deviations"):
        assert topic in titles


def test_every_section_reference_in_the_tree_exists():
    sections = set(method_sections(read(METHOD)))
    assert bad_references(ROOT, sections) == []


def test_the_checker_catches_a_missing_section(tmp_path):
    sign = "\u00a7"  # escaped: a literal bad reference here would trip the test above
    (tmp_path / "good.py").write_text(f'"""See method.md {sign}2 and {sign}3."""\n', encoding="utf-8")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.md").write_text(f"text\nas method.md {sign}99 says\n", encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "generated.md").write_text(f"{sign}77\n", encoding="utf-8")  # skipped folder
    assert bad_references(str(tmp_path), {1, 2, 3}) == [os.path.join("pkg", "bad.md") + f":2: {sign}99"]


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for path in tree_files(ROOT):
        with open(path, encoding="utf-8") as f:
            hits += [f"{os.path.relpath(path, ROOT)}:{k}" for k, line in enumerate(f, 1) if MISSING_FILES_RE.search(line)]
    assert hits == []


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
    assert [c for c in commands if "pip install" in c] == [tests]  # everything comes from the requirement files
    assert "set -euo pipefail" in commands  # a failing (or empty, exit 5) pytest fails CI


def test_deviations_table_states_what_the_code_does():
    """The rendering and evaluation rows of the deviations table (method.md §23, README); the R_fmt row is
    tests/test_reward.py's test_unparsable_answer_scores_zero_localization_and_format."""
    import data_gen
    import eval as evaluation
    import train

    assert data_gen.SUITE_YLIM["anomllm"] == (-1.25, 1.25)
    assert (data_gen.DEFAULT_WIDTH, data_gen.DEFAULT_HEIGHT) == (1064, 140)
    assert data_gen.visual_tokens(data_gen.DEFAULT_WIDTH, data_gen.DEFAULT_HEIGHT) == 190
    assert evaluation.parse_args(["--model", "baseline:empty", "--data", "d"]).temperature == 0.0  # greedy
    for model in ("tiny", "qwen2.5-vl-3b"):
        assert train.parse_args(["--model", model]).eval_temperature == 0.4  # the paper's validation
