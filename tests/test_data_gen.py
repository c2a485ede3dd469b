"""data_gen: reproducibility, family semantics, intervals, renderer (no ground truth), loader errors, CLI."""
import inspect
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

import data_gen as dg

SPEC_PARAMS = {  # the table of method.md §4, written out independently of data_gen's constants
    "range": (800.0, 10, 20.0, 5, 8), "point": (800.0, 200, 30.0, 5, 8),
    "freq": (450.0, 20, 15.0, 7, None), "trend": (1700.0, 800, 100.0, 50, 8),
}


def anomalous_index(suite, family, seed, want=True, limit=200):
    """First index whose series has (want=True) or lacks an anomaly."""
    for i in range(limit):
        if bool(dg.make_series(suite, family, i, seed)[1]) == want:
            return i
    raise AssertionError(f"no {'anomalous' if want else 'normal'} {family} series in {limit} draws")


def png_pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------------------------- reproducibility

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same small run twice: once in one process, once with two worker processes."""
    a = str(tmp_path_factory.mktemp("a"))
    b = str(tmp_path_factory.mktemp("b"))
    fams = ["range", "point", "freq", "noisy-trend"]
    dg.generate(a, "anomllm", 3, 3407, families=fams, progress=False, workers=1)
    dg.generate(b, "anomllm", 3, 3407, families=fams, progress=False, workers=2)
    return a, b


def test_same_seed_gives_byte_identical_files(two_runs):
    a, b = two_runs
    for name in ("samples.jsonl", "manifest.json"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    images = sorted(os.listdir(os.path.join(a, "images")))
    assert images == sorted(os.listdir(os.path.join(b, "images"))) and len(images) == 12
    for name in images:
        with open(os.path.join(a, "images", name), "rb") as fa, open(os.path.join(b, "images", name), "rb") as fb:
            assert fa.read() == fb.read(), name
    # atomic writes leave no temporary files behind
    leftovers = [n for root, _, files in os.walk(a) for n in files if n.startswith(".tmp")]
    assert leftovers == []


def test_different_seed_changes_data(tmp_path):
    x1, _ = dg.make_series("anomllm", "range", 0, 1)
    x2, _ = dg.make_series("anomllm", "range", 0, 2)
    assert not np.allclose(x1, x2)


def test_subset_equals_same_rows_of_full_run(two_runs, tmp_path):
    full = {s.id: s for s in dg.load_samples(two_runs[0])}
    sub = dg.generate(str(tmp_path), "anomllm", 2, 3407, families=["freq", "range"], progress=False)
    assert [s.id for s in sub] == [f"anomllm-s3407-{f}-{i:05d}" for f in ("freq", "range") for i in range(2)]
    for s in sub:
        assert s == full[s.id]
        assert png_pixels(os.path.join(tmp_path, s.image)).tobytes() == \
            png_pixels(os.path.join(two_runs[0], s.image)).tobytes()


def test_make_series_is_pure_and_order_independent():
    order = [("anomllm", "freq", 5), ("tods", "shapelet", 2), ("anomllm", "range", 9), ("anomllm", "freq", 5)]
    first = [dg.make_series(s, f, i, 42) for s, f, i in order]
    again = [dg.make_series(s, f, i, 42) for s, f, i in reversed(order)][::-1]
    for (x1, iv1), (x2, iv2) in zip(first, again):
        assert np.array_equal(x1, x2) and iv1 == iv2
    np.random.seed(0)  # the global RNG must not matter
    x3, _ = dg.make_series("anomllm", "freq", 5, 42)
    np.random.seed(1)
    x4, _ = dg.make_series("anomllm", "freq", 5, 42)
    assert np.array_equal(x3, x4) and np.array_equal(x3, first[0][0])


# --------------------------------------------------------------------------------------------- coverage

def test_every_family_has_a_valid_label():
    assert dg.LABELS == ("global point", "contextual point", "seasonal", "trend", "shapelet", "normal")
    assert len(dg.ANOMLLM_FAMILIES) == 8 and len(dg.TODS_TYPES) == 5
    assert set(dg.FAMILY_LABEL) == set(dg.ANOMLLM_FAMILIES) | set(dg.TODS_TYPES)
    for family, label in dg.FAMILY_LABEL.items():
        assert label in dg.LABELS and label != "normal" and "unknown" not in label, family
    # flat-trend and the noisy families map like their clean counterparts (the public map missed them)
    assert dg.FAMILY_LABEL["flat-trend"] == dg.FAMILY_LABEL["noisy-trend"] == "trend"
    assert dg.FAMILY_LABEL["noisy-point"] == "contextual point" and dg.FAMILY_LABEL["noisy-freq"] == "seasonal"
    assert dg.FAMILY_LABEL["shapelet"] == "shapelet"


def test_generated_labels_cover_all_six(two_runs, tmp_path):
    samples = dg.load_samples(two_runs[0])
    samples += dg.generate(str(tmp_path), "tods", 1, 3407, progress=False)
    for s in samples:
        assert s.label == (dg.FAMILY_LABEL[s.family] if s.intervals else "normal")
    labels = {s.label for s in samples} | {dg.FAMILY_LABEL[f] for f in dg.ANOMLLM_FAMILIES}
    assert labels == set(dg.LABELS)
    assert all(s.intervals for s in samples if s.family in dg.TODS_TYPES)  # TODS-style: always anomalous


# --------------------------------------------------------------------------------------------- intervals

@settings(max_examples=60, deadline=None)
@given(suite_family=st.sampled_from([("anomllm", f) for f in dg.ANOMLLM_FAMILIES] +
                                    [("tods", f) for f in dg.TODS_TYPES]),
       index=st.integers(0, 10_000), seed=st.integers(0, 2**31 - 1))
def test_intervals_are_valid(suite_family, index, seed):
    suite, family = suite_family
    x, intervals = dg.make_series(suite, family, index, seed)
    length = dg.SUITE_LENGTH[suite]
    assert x.shape == (length,) and np.all(np.isfinite(x))
    prev = 0
    for item in intervals:
        assert isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)
        s, e = item
        assert prev <= s < e <= length  # half-open, sorted, disjoint
        prev = e
    if family != "freq" and family != "noisy-freq" and suite == "anomllm":
        assert len(intervals) <= 8


def test_interval_process_matches_closed_form():
    """Anomaly-free share P(gap >= L) = exp(-L/g) and the mean length E[floor(max(Exp(a), m))] =
    m + e^{-(m+1)/a} / (1 - e^{-1/a}) (cut at L changes it by < 1 % for range)."""
    n, length = 4000, 1000
    rng = np.random.default_rng(5)
    spec = dg.IntervalSpec(*SPEC_PARAMS["range"])
    draws = [dg.sample_intervals(rng, length, spec) for _ in range(n)]
    free = np.mean([not d for d in draws])
    expected_free = math.exp(-length / 800.0)
    assert abs(free - expected_free) < 4 * math.sqrt(expected_free * (1 - expected_free) / n)
    lens = np.array([e - s for d in draws for s, e in d])
    a, m = 20.0, 5
    expected_len = m + math.exp(-(m + 1) / a) / (1 - math.exp(-1 / a))
    assert abs(lens.mean() - expected_len) < 0.04 * expected_len
    assert lens.min() >= 1 and np.mean(lens >= m) > 0.97  # only cuts at L go below the minimum


# --------------------------------------------------------------------------------------------- family semantics

def test_range_family_shifts_by_half_to_point_eight():
    i = anomalous_index("anomllm", "range", 11)
    x, intervals = dg.make_series("anomllm", "range", i, 11)
    outside = ~np.isin(np.arange(1000), [t for s, e in intervals for t in range(s, e)])
    assert abs(x[outside].std() - 0.1) < 0.015 and abs(x[outside].mean()) < 0.02
    for s, e in intervals:
        seg = x[s:e]
        sign = np.sign(seg.mean())
        # shift U(0.5, 0.8) of one sign plus N(0, 0.1): the mean of the shifted values is ~0.65
        assert 0.4 < sign * seg.mean() < 0.9


def test_point_family_is_exact_sine_outside_intervals():
    for noisy in (False, True):
        family = "noisy-point" if noisy else "point"
        i = anomalous_index("anomllm", family, 3)
        x, intervals = dg.make_series("anomllm", family, i, 3)
        t = np.arange(1000)
        base = np.sin(2 * np.pi * 0.03 * t)
        mask = np.zeros(1000, bool)
        for s, e in intervals:
            mask[s:e] = True
        resid = x[~mask] - base[~mask]
        if noisy:
            assert abs(resid.std() - 0.08) < 0.01
        else:
            assert np.max(np.abs(resid)) < 1e-12
        # inside: noise of std 0.5 that has nothing to do with the sine
        assert np.corrcoef(x[mask], base[mask])[0, 1] < 0.6


def test_freq_family_is_phase_continuous_frequency_change():
    i = anomalous_index("anomllm", "freq", 8)
    x, intervals = dg.make_series("anomllm", "freq", i, 8)
    # each interval is x3 or /3; exactly one choice per interval reproduces the series
    import itertools
    hits = 0
    for choice in itertools.product((3.0, 1 / 3.0), repeat=len(intervals)):
        f = np.full(1000, 0.03)
        for (s, e), c in zip(intervals, choice):
            f[s:e] *= c
        hits += np.max(np.abs(np.sin(2 * np.pi * np.cumsum(f)) - x)) < 1e-9
    assert hits == 1


@pytest.mark.parametrize("family,slopes", [("trend", (6.0, 20.0)), ("flat-trend", (4.5, 6.0))])
def test_trend_family_rate_changes_only_inside(family, slopes):
    i = anomalous_index("anomllm", family, 21)
    x, intervals = dg.make_series("anomllm", family, i, 21)
    assert x.min() == pytest.approx(-1.0) and x.max() == pytest.approx(1.0)
    t = np.arange(1000)
    dsin = np.diff(np.sin(2 * np.pi * 0.02 * t))  # [999]
    d = np.diff(x)  # [999] = a·(dsin + rate_t), rate = slope/L
    inside = np.zeros(999, bool)
    for s, e in intervals:
        inside[s:e] = True  # step t -> t+1 uses the rate of point t+1 ... (t+1 in [s, e))
        inside[max(0, s - 1)] = True
    a, b = np.linalg.lstsq(np.c_[dsin[~inside], np.ones((~inside).sum())], d[~inside], rcond=None)[0]
    assert np.max(np.abs(a * dsin[~inside] + b - d[~inside])) < 1e-9
    assert b / a == pytest.approx(3.0 / 1000, rel=1e-6)  # normal slope 3 over L
    for s, e in intervals:
        rate = (d[s:e - 1] / a - dsin[s:e - 1]) * 1000  # [e-s-1] slope units
        if rate.size:
            assert np.ptp(rate) < 1e-6 and slopes[0] - 1e-9 <= rate[0] <= slopes[1] + 1e-9


def test_tods_types_have_their_signature():
    seed = 4
    x, iv = dg.make_series("tods", "global", 0, seed)
    inside = np.array([x[s] for s, _ in iv])
    rest = np.delete(x, [s for s, _ in iv])
    assert np.all((inside > rest.max()) | (inside < rest.min()))  # spikes leave the range
    x, iv = dg.make_series("tods", "contextual", 0, seed)
    rest = np.delete(x, [s for s, _ in iv])
    for s, _ in iv:
        assert rest.min() <= x[s] <= rest.max()  # inside the global range ...
        assert abs(x[s] - (x[s - 1] + x[s + 1]) / 2) > 1.0  # ... but far from its neighbours
    x, iv = dg.make_series("tods", "shapelet", 0, seed)
    s, e = iv[0]
    assert np.mean(np.abs(np.abs(x[s:e]) - 1.5) < 0.25) > 0.9  # square wave at ±1.5 (+ noise)


def test_bad_family_and_suite_give_clear_errors():
    with pytest.raises(ValueError, match="unknown family 'spike'.*choose from"):
        dg.make_series("anomllm", "spike", 0, 0)
    with pytest.raises(ValueError, match="unknown suite"):
        dg.make_series("ucr", "range", 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        dg.make_series("anomllm", "range", -1, 0)


# --------------------------------------------------------------------------------------------- renderer

def test_render_geometry_and_token_count():
    assert dg.DEFAULT_WIDTH % 28 == 0 and dg.DEFAULT_HEIGHT % 28 == 0
    assert dg.visual_tokens(dg.DEFAULT_WIDTH, dg.DEFAULT_HEIGHT) == (dg.DEFAULT_WIDTH // 28) * (dg.DEFAULT_HEIGHT // 28)
    img = dg.render_series(np.zeros(1000))
    assert img.mode == "RGB" and img.size == (dg.DEFAULT_WIDTH, dg.DEFAULT_HEIGHT)
    with pytest.raises(ValueError, match="multiples of 28"):
        dg.render_series(np.zeros(10), width=1000)
    with pytest.raises(ValueError, match="finite"):
        dg.render_series([0.0, float("nan"), 1.0])


@pytest.mark.parametrize("length,k", [(1000, 0), (1000, 417), (1000, 999), (400, 123)])
def test_x_mapping_puts_a_spike_at_its_column(length, k):
    """A single spike at index k is drawn in the pixel column floor(x(k + 0.5)) (independent check:
    the line's highest pixel)."""
    x = np.zeros(length)
    x[k] = 1.0
    px = np.asarray(dg.render_series(x, ylim=(-1.25, 1.25)))
    line = np.all(px == np.array(dg.LINE), axis=2)  # [H, W]
    rows, cols = np.nonzero(line)
    top = rows.min()
    assert int(np.floor(float(dg.x_to_pixel(k + 0.5, length)))) in cols[rows == top]
    left, _, plot_w, _ = dg.plot_box(dg.DEFAULT_WIDTH, dg.DEFAULT_HEIGHT)
    assert dg.x_to_pixel(0, length) == left and dg.x_to_pixel(length, length) == left + plot_w


def test_images_show_no_ground_truth(two_runs):
    """The stored PNG equals a rendering of the sample with its intervals and label removed, and uses only
    the four plot colours (no shading, no marks)."""
    import dataclasses

    signature = inspect.signature(dg.render_series)
    assert not any(w in name for name in signature.parameters for w in ("interval", "label", "truth", "mask"))
    samples = dg.load_samples(two_runs[0])
    assert any(s.intervals for s in samples)
    for s in samples:
        stored = png_pixels(os.path.join(two_runs[0], s.image))
        blind = dataclasses.replace(s, intervals=[], label="normal", expcot="", gencot="", family="range",
                                    id="x", image="")
        assert np.array_equal(stored, np.asarray(dg.render_sample(blind, "anomllm").convert("RGB")))
        assert np.array_equal(stored, np.asarray(dg.render_series(s.series, ylim=dg.SUITE_YLIM["anomllm"])))
        colours = {tuple(c) for c in np.unique(stored.reshape(-1, 3), axis=0)}
        assert colours <= set(dg.PALETTE)


def test_draw_intervals_only_touches_interval_columns():
    img = dg.render_series(np.sin(np.arange(1000) / 20))
    shaded = dg.draw_intervals(img, 1000, [[100, 150], [600, 601]])
    diff = np.any(np.asarray(shaded) != np.asarray(img), axis=2)  # [H, W]
    cols = set(np.nonzero(diff.any(axis=0))[0].tolist())
    expect = set()
    for s, e in [[100, 150], [600, 601]]:
        expect |= set(range(int(np.floor(float(dg.x_to_pixel(s, 1000)))),
                            int(np.ceil(float(dg.x_to_pixel(e, 1000))))))
    assert cols and cols <= expect
    assert np.array_equal(np.asarray(img), np.asarray(dg.render_series(np.sin(np.arange(1000) / 20))))  # copy


def test_manifest_records_render_settings(two_runs):
    with open(os.path.join(two_runs[0], "manifest.json")) as fh:
        manifest = json.load(fh)
    render = manifest["render"]
    assert render["visual_tokens"] == (render["width"] // 28) * (render["height"] // 28)
    assert manifest["suite"] == "anomllm" and manifest["seed"] == 3407 and manifest["counts"]["total"] == 12
    assert sum(manifest["counts"]["by_label"].values()) == 12 and render["ground_truth_drawn"] is False


def test_a_folder_of_an_older_expcot_gets_current_traces(two_runs, tmp_path):
    import shutil

    import expert_cot

    current = dg.load_samples(two_runs[0])
    with open(os.path.join(two_runs[0], "manifest.json")) as fh:
        assert json.load(fh)["expcot_version"] == expert_cot.EXPCOT_VERSION
    assert dg.with_current_expcot(two_runs[0], current, progress=False) is current  # up to date: as stored
    old = str(tmp_path / "old")
    shutil.copytree(two_runs[0], old)
    with open(os.path.join(old, "manifest.json")) as fh:
        manifest = json.load(fh)
    del manifest["expcot_version"]  # a folder written before the field: version 1
    with open(os.path.join(old, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    with open(os.path.join(old, "samples.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    with open(os.path.join(old, "samples.jsonl"), "w") as fh:
        fh.writelines(json.dumps({**r, "expcot": "an old trace"}) + "\n" for r in rows)
    stale = dg.load_samples(old)
    assert dg.folder_expcot_version(old) == "1" and {s.expcot for s in stale} == {"an old trace"}
    fresh = dg.with_current_expcot(old, stale, progress=False, workers=1)
    assert [s.expcot for s in fresh] == [s.expcot for s in current]  # what a fresh generation writes
    assert [s.series for s in fresh] == [s.series for s in stale]


# --------------------------------------------------------------------------------------------- loader

def test_load_samples_filters_and_limits(two_runs):
    all_rows = dg.load_samples(two_runs[0])
    assert len(all_rows) == 12
    assert [s.family for s in dg.load_samples(two_runs[0], families=["freq"])] == ["freq"] * 3
    assert len(dg.load_samples(two_runs[0], limit=5)) == 5
    s = all_rows[0]
    assert s.image == f"images/{s.id}.png" and s.length == len(s.series) == 1000


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return os.path.join(dst, "samples.jsonl")


def test_loader_names_file_and_line_of_a_corrupt_line(two_runs, tmp_path):
    path = copy_run(two_runs[0], tmp_path / "d")
    lines = open(path).read().splitlines()
    lines[2] = lines[2][:50]
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(dg.DataError, match=r"samples\.jsonl:3: corrupt line"):
        dg.load_samples(str(tmp_path / "d"))


def test_loader_names_missing_field_and_image(two_runs, tmp_path):
    path = copy_run(two_runs[0], tmp_path / "d")
    rows = [json.loads(line) for line in open(path)]
    del rows[1]["expcot"]
    open(path, "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(dg.DataError, match=r"samples\.jsonl:2: missing field\(s\) expcot"):
        dg.load_samples(str(tmp_path / "d"))
    path = copy_run(two_runs[0], tmp_path / "e")
    victim = json.loads(open(path).readlines()[3])
    os.remove(os.path.join(tmp_path / "e", victim["image"]))
    with pytest.raises(dg.DataError, match=r"samples\.jsonl:4: image file .*" + victim["id"]):
        dg.load_samples(str(tmp_path / "e"))


def test_loader_rejects_bad_intervals_and_missing_dir(two_runs, tmp_path):
    path = copy_run(two_runs[0], tmp_path / "d")
    rows = [json.loads(line) for line in open(path)]
    rows[0]["intervals"] = [[10, 5]]
    rows[0]["label"] = "global point"
    open(path, "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(dg.DataError, match=r"samples\.jsonl:1: invalid interval \[10, 5\]"):
        dg.load_samples(str(tmp_path / "d"))
    with pytest.raises(dg.DataError, match="python data_gen.py --out"):
        dg.load_samples(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------- cli

def test_cli_writes_subset_and_reports_errors(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert dg.main(["--out", out, "--suite", "tods", "--per-family", "1", "--seed", "9",
                    "--families", "shapelet,trend", "--no-progress"]) == 0
    rows = dg.load_samples(out)
    assert [r.id for r in rows] == ["tods-s9-shapelet-00000", "tods-s9-trend-00000"]
    assert dg.main(["--out", out, "--suite", "anomllm", "--families", "spike", "--no-progress"]) == 2
    assert "unknown family 'spike'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --help shows the defaults, as train.py does (timerpo/cli.py)
        dg.parse_args(["--help"])
    assert "[default: 400]" in capsys.readouterr().out


def test_cli_refuses_an_out_that_holds_data_and_overwrite_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "d"
    flags = ["--out", str(out), "--suite", "anomllm", "--no-progress"]
    assert dg.main(flags + ["--per-family", "2"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert dg.main(flags + ["--per-family", "1", "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert dg.main(flags + ["--per-family", "1", "--seed", "5", "--overwrite"]) == 0
    samples = dg.load_samples(str(out))
    assert len(samples) == 8 and sorted(os.listdir(out / "images")) == sorted(f"{s.id}.png" for s in samples)
    assert os.listdir(tmp_path) == ["d"]  # the folder it was written in beside was renamed, nothing left over
