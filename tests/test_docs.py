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


def test_deviations_of_the_prompt_and_parser_state_what_the_code_does():
    """The §1/§2 rows of the deviations table and §17's four forbidden tokens; the token-mean row is
    tests/test_algorithm.py: test_accumulation_equals_one_big_batch."""
    from timerpo.policy import FORBIDDEN_TOKENS
    from timerpo.prompt import build_prompt, parse_completion

    twice = "<think>a</think><answer>[]</answer><class>normal</class> <class>trend</class>"
    assert parse_completion(twice, 100).label == "trend"  # the last <class>, not the first
    assert parse_completion("<think>a</think><answer>[3, 10]</answer><class>trend</class>", 100).intervals == \
        [(3, 10)]  # a bare pair is one interval
    assert parse_completion("<answer>__import__('os')</answer>", 100).intervals is None  # never evaluated
    prompt = build_prompt(100)
    assert "0 <= s < e <= 100" in prompt and "global point (values far outside the usual range)" in prompt
    assert len(FORBIDDEN_TOKENS) == 4 and "<|vision_end|>" in FORBIDDEN_TOKENS


# --------------------------------------------------------------------------------------- one copy of each table

DOC_PAGES = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                                  if n.endswith(".md"))
CELL_SPLIT_RE = re.compile(r"(?<!\\)\|")  # a table cell ends at an unescaped "|"
SPAN_RE = re.compile(r"`([^`]+)`")
FILE_SPAN_RE = re.compile(r"^([\w./-]+\.py)(?::\s*(.*)|\s+(--[\w-]+).*)?$")  # "x.py", "x.py: a, b", "x.py --flag"
IDENTIFIER_RE = re.compile(r"^[A-Za-z_]\w*$")


def tables(text):
    """Every markdown table of `text`: a list of (line number, cells) per body row (header and rule skipped)."""
    out, current = [], []
    for k, line in enumerate(text.splitlines(), 1):
        if line.startswith("|"):
            current.append((k, [c.strip() for c in CELL_SPLIT_RE.split(line.strip().strip("|"))]))
            continue
        if current:
            out.append(current)
        current = []
    if current:
        out.append(current)
    return [[row for row in table[1:] if not set("".join(row[1])) <= set("-: ")] for table in out]


def table_after(text, heading):
    """The first table after the line `heading`, and the line number where it starts."""
    start = text.index(heading + "\n")
    line = text.count("\n", 0, start) + 1
    table = next(t for t in tables(text) if t and t[0][0] > line)
    return table


def simplified(cell):
    return re.sub(r"[^a-z0-9]+", " ", cell.lower()).strip()


def deviation_copies(reference, pages):
    """'page:line' of each table outside `reference` with 3 or more rows whose first cell reads like a first
    cell of the deviations table (wording may have drifted: a similarity ratio of at least 0.75)."""
    import difflib

    keys = [simplified(cells[0]) for _, cells in reference]
    hits = []
    for page, text in pages.items():
        for table in tables(text):
            if page == METHOD and table == reference:
                continue
            alike = [k for k, cells in table
                     if any(difflib.SequenceMatcher(None, simplified(cells[0]), key).ratio() >= 0.75 for key in keys)]
            if len(alike) >= 3:
                hits.append(f"{page}:{alike[0]}")
    return hits


def code_names(cells_or_line):
    """(file, name, flag) triples named in backticks: `x.py: a, b` names a and b of x.py; a bare `c` after it
    names c of the same file; `x.py --flag` names a flag of x.py, and a bare `--flag` one of train.py;
    `x.py` alone names the file."""
    out, current = [], None
    for span in SPAN_RE.findall(cells_or_line):
        m = FILE_SPAN_RE.match(span.strip())
        if m:
            current = m.group(1)
            names = [n.strip() for n in (m.group(2) or "").split(",") if n.strip()]
            out += [(current, n, None) for n in names] or [(current, None, m.group(3))]
        elif span.startswith("--"):
            out.append(("train.py", None, span.split()[0]))
        elif IDENTIFIER_RE.match(span) and current:
            out.append((current, span, None))
    return out


def map_copies(reference, pages):
    """'page:line' of each table outside `reference` with 3 or more rows naming a function the map names."""
    named = {(f, n) for _, cells in reference for f, n, _ in code_names(" ".join(cells)) if n}
    hits = []
    for page, text in pages.items():
        for table in tables(text):
            if page == METHOD and table == reference:
                continue
            alike = [k for k, cells in table if any((f, n) in named for f, n, _ in code_names(" ".join(cells)))]
            if len(alike) >= 3:
                hits.append(f"{page}:{alike[0]}")
    return hits


def read_pages():
    return {page: read(page) for page in DOC_PAGES}


def test_each_reference_table_exists_once():
    """The deviations from the release and the paper ↔ code map live in method.md only; a second, drifting copy
    anywhere in the README or docs/ fails."""
    pages = read_pages()
    deviations = table_after(pages[METHOD], "## §23 Deviations from the public release")
    paper_code = table_after(pages[METHOD], "## Paper ↔ code")
    assert len(deviations) >= 19 and len(paper_code) == len(method_sections(pages[METHOD]))
    assert deviation_copies(deviations, pages) == []
    assert map_copies(paper_code, pages) == []


def test_the_copy_checks_catch_a_reworded_copy():
    method = read(METHOD)
    deviations = table_after(method, "## §23 Deviations from the public release")
    paper_code = table_after(method, "## Paper ↔ code")
    reworded = "\n".join(["| release | here |", "|---|---|",
                          "| `range` data reseeded from OS entropy | pure function |",
                          "| plot y-limits (−1, 1) | ±1.25 |",
                          "| validation sampled at temperature 0.4 | greedy |", ""])
    remapped = "\n".join(["| § | code |", "|---|---|", "| §8 | `ot.py: cosine_cost` |",
                          "| §9 | `ot.py: norm_softmax_marginal` |", "| §11 | `ot.py: ot_distance` |", ""])
    pages = {METHOD: method, "README.md": "intro\n\n" + reworded + "\ntext\n\n" + remapped}
    assert deviation_copies(deviations, pages) == ["README.md:5"]
    assert map_copies(paper_code, pages) == ["README.md:13"]


def help_text(script, cache={}):
    import subprocess
    import sys

    if script not in cache:
        cache[script] = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=300).stdout
    return cache[script]


def missing_code_names(text):
    """Each file, function or flag named in `text` (a paper ↔ code map) that does not exist."""
    import importlib

    missing = []
    for path, name, flag in code_names(text):
        if not os.path.isfile(os.path.join(ROOT, path)):
            missing.append(path)
        elif name and not hasattr(importlib.import_module(path[:-3].replace("/", ".")), name):
            missing.append(f"{path}: {name}")
        elif flag and not re.search(re.escape(flag) + r"\b", help_text(path)):
            missing.append(f"{path} {flag}")
    return missing


def test_every_file_function_and_flag_of_the_paper_code_map_exists():
    text = read(METHOD)
    section = text[text.index("## Paper ↔ code\n"):text.index("## §1 ")]
    assert len(code_names(section)) > 60
    assert missing_code_names(section) == []
    # the resolver itself: a renamed function, a missing file and an unknown flag are each caught
    assert missing_code_names("`ot.py: sinkhorn, sinkhorn_slow`; `timerpo/gone.py`; `train.py --no-such-flag`") == \
        ["ot.py: sinkhorn_slow", "timerpo/gone.py", "train.py --no-such-flag"]


# ------------------------------------------------------------------------------------------- links and pictures

LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """The anchor GitHub gives a heading: lowercase, punctuation and symbols dropped, each space a hyphen."""
    text = heading.strip().replace("`", "").lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(text):
    out, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(pages, exists=lambda path: os.path.exists(os.path.join(ROOT, path))):
    """'page: target' for each relative link whose file is missing, or whose #anchor is no heading there."""
    bad = []
    for page, text in pages.items():
        for target in LINK_RE.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not exists(path):
                bad.append(f"{page}: {target}")
            elif anchor and path.endswith(".md") and anchor not in anchors(read(path)):
                bad.append(f"{page}: {target}")
    return bad


def test_section_links_reach_their_sections():
    """From the README every equation is two clicks away: README → method.md#N-..., or method.md's map → §N."""
    assert "7-main-advantage" in anchors(read(METHOD)) and slug("§8 OT cost, C") == "8-ot-cost-c"
    pages = read_pages()
    method_links = [t for t in LINK_RE.findall(pages["README.md"]) if t.startswith(METHOD + "#")]
    assert len(method_links) >= 15
    assert [b for b in broken_links(pages, exists=lambda path: True) if "#" in b] == []
    assert set(method_sections(pages[METHOD])) <= {int(m) for m in re.findall(r"\]\(#(\d+)-", pages[METHOD])}


def test_relative_links_point_to_files_that_exist():
    assert broken_links(read_pages()) == []


def test_every_picture_in_docs_is_shown_somewhere():
    pages = read_pages()
    shown = {os.path.normpath(os.path.join(os.path.dirname(page), t)) for page, text in pages.items()
             for t in LINK_RE.findall(text)}
    pictures = {os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".png")}
    assert sorted(pictures - shown) == []


def test_readme_is_short_and_names_only_presets_that_exist():
    import train

    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    named = {p for page in DOC_PAGES for p in re.findall(r"--preset[ =]([\w-]+)", read(page))}
    assert named <= set(train.PRESETS)
