"""Real series: series_io.py, `data_gen.py --suite series` and `eval.py --series`.

Every input file is written here, in each supported format. Oracles are computed here: intervals from the
planted labels, windows by brute force, scores by calling the metric on the expected intervals.
"""
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import baselines
import data_gen
import eval as ev
import expert_cot
import series_io
from timerpo import plots
from timerpo.evaluate import score_prediction, summarize
from timerpo.metrics import localization_scores, to_events
from timerpo.prompt import format_completion

N = 5000
SPIKE = 1234
SHIFT = (3800, 4000)  # the level moves up by 10 noise sigmas here and comes back


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def csv_text(header, columns):
    """CSV text from a header list and equally long columns."""
    lines = [",".join(header)] if header else []
    lines += [",".join(str(v) for v in row) for row in zip(*columns)]
    return "\n".join(lines) + "\n"


def noise(n=N, seed=1):
    return np.round(np.random.default_rng(seed).normal(0.0, 0.1, n), 6)


def planted(seed=1):
    """Noise with a spike at SPIKE and a level shift on SHIFT; the truth as half-open intervals."""
    x = noise(N, seed)
    x[SPIKE] += 2.0
    x[SHIFT[0]:SHIFT[1]] += 1.0
    return x, [[SPIKE, SPIKE + 1], list(SHIFT)]


def flags(n, intervals):
    f = np.zeros(n, dtype=int)
    for s, e in intervals:
        f[s:e] = 1
    return f


def timeeval_file(path, x, intervals, stamps=None):
    stamps = list(range(len(x))) if stamps is None else stamps
    return write(path, csv_text(["timestamp", "value", "is_anomaly"], [stamps, x, flags(len(x), intervals)]))


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_series(tmp_path, model, series, *extra, out="out"):
    out_dir = str(tmp_path / out)
    rc = ev.main(["--model", model, "--series", series, "--out", out_dir, "--no-progress", "--workers", "1",
                  *extra])
    assert rc == 0
    return out_dir, strict_json(os.path.join(out_dir, "series", series_io.series_name(series), "intervals.json"))


# --------------------------------------------------------------------------------------------- formats


def test_timeeval_csv_gives_values_timestamps_and_half_open_labels(tmp_path):
    x = noise(300)
    path = timeeval_file(tmp_path / "a.csv", x, [[10, 15], [299, 300]], stamps=[f"t{k}" for k in range(300)])
    s = series_io.read_series(path)
    assert s.fmt == "timeeval" and s.column == "value" and s.name == "a" and s.length == 300
    assert np.array_equal(s.values, x)
    assert s.intervals == [[10, 15], [299, 300]]
    assert s.timestamps[:2] == ["t0", "t1"] and s.notes == []


def test_gutentag_several_value_columns_are_picked_with_column(tmp_path):
    a, b = noise(200, 1), noise(200, 2)
    path = write(tmp_path / "g.csv", csv_text(["timestamp", "value-0", "value-1", "is_anomaly"],
                                              [range(200), a, b, flags(200, [[50, 60]])]))
    with pytest.raises(series_io.SeriesError, match="several value columns .*value-0, value-1.*--column"):
        series_io.read_series(path)
    s = series_io.read_series(path, column="value-1")
    assert np.array_equal(s.values, b) and s.column == "value-1" and s.intervals == [[50, 60]]
    with pytest.raises(series_io.SeriesError, match="no column named 'value-2'"):
        series_io.read_series(path, column="value-2")


def test_a_text_column_is_not_a_value_column(tmp_path):
    x = noise(100)
    path = write(tmp_path / "c.csv", csv_text(["timestamp", "value", "comment"], [range(100), x, ["ok"] * 100]))
    assert np.array_equal(series_io.read_series(path).values, x)


def test_tsb_uad_out_file(tmp_path):
    x = noise(400)
    path = write(tmp_path / "ECG_1.out", csv_text(None, [x, flags(400, [[0, 3], [200, 250]])]))
    s = series_io.read_series(path)
    assert s.fmt == "tsb-uad" and s.timestamps is None and s.column is None
    assert np.array_equal(s.values, x) and s.intervals == [[0, 3], [200, 250]]


def test_nab_csv_with_a_labels_file(tmp_path):
    x = noise(500)
    stamps = [f"2014-04-01 {h:02d}:{m:02d}:00" for h in range(24) for m in range(0, 60, 5)][:288]
    stamps += [f"2014-04-02 {h:02d}:{m:02d}:00" for h in range(24) for m in range(0, 60, 5)][:500 - 288]
    path = write(tmp_path / "realKnownCause" / "nyc_taxi.csv", csv_text(["timestamp", "value"], [stamps, x]))
    # NAB writes both ends inclusive, with microseconds; keys carry the data folder.
    labels = write(tmp_path / "labels.json", json.dumps({"realKnownCause/nyc_taxi.csv": [
        ["2014-04-02 00:00:00.000000", "2014-04-02 00:10:00.000000"],
        ["2014-04-01 01:00:00.000000", "2014-04-01 01:00:00.000000"]]}))
    s = series_io.read_series(path, labels_path=labels)
    assert s.fmt == "nab"
    assert s.intervals == [[12, 13], [288, 291]]  # sorted; 00:00, 00:05, 00:10 of the second day
    assert series_io.timestamp_spans(s.intervals, s.timestamps) == [
        ["2014-04-01 01:00:00", "2014-04-01 01:00:00"], ["2014-04-02 00:00:00", "2014-04-02 00:10:00"]]


def test_numeric_timestamps_take_numeric_label_windows(tmp_path):
    x = noise(200)
    path = write(tmp_path / "n.csv", csv_text(["timestamp", "value"], [np.arange(200) * 0.5, x]))
    labels = write(tmp_path / "l.json", json.dumps({"n.csv": [[10, 12.2]]}))
    assert series_io.read_series(path, labels_path=labels).intervals == [[20, 25]]


@pytest.mark.parametrize("header", [True, False])
def test_plain_one_column_csv_has_no_labels(tmp_path, header):
    x = noise(150)
    path = write(tmp_path / "p.csv", csv_text(["value"] if header else None, [x]))
    s = series_io.read_series(path)
    assert s.fmt == "unlabelled" and s.intervals is None and s.timestamps is None
    assert np.array_equal(s.values, x)


def test_missing_values_are_interpolated_with_a_warning(tmp_path, capsys):
    cells = ["1.0", "", "3.0", "nan", "NA", "6.0"] + [str(v) for v in noise(100)]
    path = write(tmp_path / "gaps.csv", "value\n" + "\n".join(cells) + "\n")
    s = series_io.read_series(path)
    assert s.values[:6].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert len(s.notes) == 1 and "3 missing values in 2 gaps (longest 2)" in s.notes[0]
    assert data_gen.main(["--suite", "series", "--input", path, "--window", "64", "--out", str(tmp_path / "o"),
                          "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "linear interpolation" in err
    manifest = strict_json(tmp_path / "o" / "manifest.json")
    assert manifest["sources"][0]["notes"] == s.notes


def test_min_window_is_what_the_detector_needs():
    assert series_io.MIN_WINDOW == expert_cot.StagedScan.MIN_LENGTH


# --------------------------------------------------------------------------------------------- windows


def test_window_starts_cover_every_index_with_full_windows():
    for n in range(64, 260, 7):
        for window in (64, 100, n):
            if window > n:
                continue
            for stride in range(1, window + 1, 9):
                starts = series_io.window_starts(n, window, stride)
                covered = np.zeros(n, dtype=int)
                for s in starts:
                    assert 0 <= s and s + window <= n
                    covered[s:s + window] += 1
                assert covered.min() >= 1, (n, window, stride)
                assert starts[0] == 0 and starts[-1] == n - window and starts == sorted(set(starts))
                assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@settings(max_examples=100, deadline=None)
@given(n=st.integers(64, 600), window=st.integers(64, 600), stride=st.integers(1, 600),
       cuts=st.lists(st.integers(0, 600), max_size=12))
def test_cut_into_windows_and_merged_back_is_exact(n, window, stride, cuts):
    window = min(window, n)
    stride = min(stride, window)
    edges = sorted({c for c in cuts if c <= n})
    truth = [list(iv) for iv in to_events([edges[k:k + 2] for k in range(0, len(edges) - 1, 2)], n)]
    pieces = [(s, series_io.cut_intervals(truth, s, window)) for s in series_io.window_starts(n, window, stride)]
    for s, local in pieces:
        assert all(0 <= a < b <= window for a, b in local)
    assert series_io.merge_windows(pieces, n) == truth


def test_an_interval_across_a_window_edge_is_cut_and_merged_back():
    starts = series_io.window_starts(2500, 1000, 1000)
    assert starts == [0, 1000, 1500]
    pieces = [(s, series_io.cut_intervals([[950, 1050]], s, 1000)) for s in starts]
    assert pieces == [(0, [[950, 1000]]), (1000, [[0, 50]]), (1500, [])]
    assert series_io.merge_windows(pieces, 2500) == [[950, 1050]]


def test_normalise_window_scales_to_minus_one_one():
    x = np.array([3.0, 5.0, 4.0])
    assert series_io.normalise_window(x).tolist() == [-1.0, 1.0, 0.0]
    assert series_io.normalise_window(np.full(5, 7.0)).tolist() == [0.0] * 5


# --------------------------------------------------------------------------------------------- import


def test_import_a_folder_writes_windows_images_and_manifest(tmp_path, capsys):
    folder = tmp_path / "in"
    x, truth = planted()
    timeeval_file(folder / "planted.csv", x[:3000], [[SPIKE, SPIKE + 1], [2990, 3000]])
    write(folder / "plain.csv", csv_text(["value"], [noise(700, 5)]))
    write(folder / "notes.txt", "not a series\n")  # other suffixes are not read
    out = tmp_path / "data"
    assert data_gen.main(["--suite", "series", "--input", str(folder), "--window", "1000", "--stride", "700",
                          "--out", str(out), "--no-progress"]) == 2  # plain.csv is shorter than one window
    assert not out.exists() and "plain.csv: 700 points" in capsys.readouterr().err
    assert data_gen.main(["--suite", "series", "--input", str(folder), "--window", "500", "--stride", "350",
                          "--out", str(out), "--no-progress"]) == 0

    samples = data_gen.load_samples(str(out))
    manifest = strict_json(out / "manifest.json")
    assert manifest["suite"] == "series" and manifest["window"] == 500 and manifest["stride"] == 350
    by_name = {src["name"]: src for src in manifest["sources"]}
    assert set(by_name) == {"planted", "plain"}
    assert [w["offset"] for w in by_name["planted"]["windows"]] == series_io.window_starts(3000, 500, 350)
    assert [w["offset"] for w in by_name["plain"]["windows"]] == [0, 200]
    assert len(samples) == manifest["counts"]["total"] == sum(len(src["windows"]) for src in manifest["sources"])
    raw = {"planted": x[:3000], "plain": noise(700, 5)}
    pieces = []
    for src in manifest["sources"]:
        assert src["file"].endswith(src["name"] + ".csv")
        for w in src["windows"]:
            sample = next(s for s in samples if s.id == w["id"])
            chunk = raw[src["name"]][w["offset"]:w["offset"] + 500]
            assert sample.family == src["name"] and sample.length == 500
            assert w["min"] == chunk.min() and w["max"] == chunk.max()
            expected = np.round(2 * (chunk - chunk.min()) / (chunk.max() - chunk.min()) - 1, 5)
            assert np.allclose(sample.series, expected, atol=1e-12)
            with Image.open(out / sample.image) as img:
                stored = np.asarray(img.convert("RGB"))
            rendered = np.asarray(data_gen.render_series(sample.series, ylim=(-1.25, 1.25)))
            assert np.array_equal(stored, rendered)  # the synthetic data's renderer, on the anomllm axis
            if src["name"] == "plain":
                assert sample.intervals is None and sample.label == data_gen.UNKNOWN
            else:
                assert sample.label == (data_gen.UNKNOWN if sample.intervals else "normal")
                pieces.append((w["offset"], sample.intervals))
    assert series_io.merge_windows(pieces, 3000) == by_name["planted"]["intervals"] == [[SPIKE, SPIKE + 1],
                                                                                          [2990, 3000]]


def test_samples_of_unknown_class_are_checked():
    base = {"id": "x", "family": "f", "length": 3, "series": [0.0, 1.0, 0.0], "image": "i.png", "expcot": "",
            "gencot": ""}
    data_gen.check_sample_fields(dict(base, label="unknown", intervals=[[1, 2]]), "w")
    data_gen.check_sample_fields(dict(base, label="unknown", intervals=None), "w")
    data_gen.check_sample_fields(dict(base, label="normal", intervals=[]), "w")
    for label, intervals, message in [("unknown", [], "is 'normal'"), ("trend", None, "needs label 'unknown'"),
                                      ("unknown", [[2, 9]], "invalid interval"), ("odd", [], "not one of")]:
        with pytest.raises(data_gen.DataError, match=message):
            data_gen.check_sample_fields(dict(base, label=label, intervals=intervals), "w")


def test_training_takes_labelled_imports_and_refuses_unlabelled_ones(tmp_path, capsys):
    import train

    path = timeeval_file(tmp_path / "r.csv", noise(200), [[5, 9]])
    assert data_gen.main(["--suite", "series", "--input", path, "--window", "100", "--out", str(tmp_path / "d"),
                          "--no-progress"]) == 0
    assert data_gen.folder_expcot_version(str(tmp_path / "d")) == expert_cot.EXPCOT_VERSION
    capsys.readouterr()
    samples = train.ensure_data(str(tmp_path / "d"), 0, False)
    assert "ExpCoT version" not in capsys.readouterr().err  # current traces: nothing recomputed
    first = samples[0]  # the window at 0 holds [5, 9): its ExpCoT names the interval but no type
    assert first.label == "unknown" and first.expcot.endswith("Conclusion: anomalous intervals [[5, 9]]; type not "
                                                              "labelled.")
    assert first.expcot == expert_cot.expert_cot(first.series, [[5, 9]], "unknown")
    assert all(s.label == "normal" and s.expcot for s in samples[1:])
    write(tmp_path / "u.csv", csv_text(["value"], [noise(200)]))
    assert data_gen.main(["--suite", "series", "--input", str(tmp_path / "u.csv"), "--window", "100", "--out",
                          str(tmp_path / "du"), "--no-progress"]) == 0
    with pytest.raises(data_gen.DataError, match="has no labels"):
        train.ensure_data(str(tmp_path / "du"), 0, False)


# --------------------------------------------------------------------------------------------- scoring


def real_sample(label, intervals, k=0):
    return data_gen.Sample(id=f"r-{k}", family="r", label=label, length=100, intervals=intervals,
                           series=[0.0] * 100, image="images/none.png", expcot="", gencot="")


def test_unknown_class_and_missing_labels_are_not_scored():
    anomalous = score_prediction(real_sample("unknown", [[10, 20]]), format_completion("r", [[10, 20]], "trend"))
    assert math.isnan(anomalous.reward.cls) and anomalous.reward.total == 1.0  # (0.1 + 0.7) / 0.8
    assert anomalous.loc.aff_f1 == 1.0 and anomalous.reward.loc == 1.0 and anomalous.reward.fmt == 1.0
    unlabelled = score_prediction(real_sample("unknown", None, 1), format_completion("r", [[1, 2]], "trend"))
    assert all(math.isnan(v) for v in vars(unlabelled.loc).values()) and unlabelled.reward.fmt == 1.0
    normal_right = score_prediction(real_sample("normal", [], 2), format_completion("r", [], "normal"))
    normal_wrong = score_prediction(real_sample("normal", [], 3), format_completion("r", [[0, 5]], "trend"))
    summary = summarize([anomalous, unlabelled, normal_right, normal_wrong])
    assert summary["cls_acc"] == 0.5  # the two normal windows only: the class of a real anomaly is unknown
    assert summary["n_known_class"] == 2 and summary["n_labelled"] == 3
    assert summary["aff_f1"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)  # the unlabelled window is left out


def test_eval_data_on_an_imported_folder(tmp_path):
    x, truth = planted()
    timeeval_file(tmp_path / "in" / "planted.csv", x, truth)
    write(tmp_path / "in" / "plain.csv", csv_text(["value"], [noise(1000, 3)]))
    assert data_gen.main(["--suite", "series", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "d"),
                          "--no-progress"]) == 0
    out = tmp_path / "o"
    assert ev.main(["--model", "baseline:empty", "--data", str(tmp_path / "d"), "--out", str(out),
                    "--no-progress"]) == 0
    results = strict_json(out / "results.json")
    rows = load_jsonl(tmp_path / "d" / "samples.jsonl")
    normal = [r for r in rows if r["label"] == "normal"]
    labelled = [r for r in rows if r["intervals"] is not None]
    assert results["suite"] == "series" and results["summary"]["groups"] == {}
    assert results["summary"]["n_known_class"] == len(normal) and 0 < len(normal) < len(labelled) < len(rows)
    assert results["summary"]["cls_acc"] == 1.0  # "normal" is right on every window without anomaly
    assert results["summary"]["aff_f1"] == pytest.approx(len(normal) / len(labelled))
    assert [f["family"] for f in results["families"]] == ["plain", "planted"]
    assert results["families"][0]["aff_f1"] is None  # the unlabelled file is not scored
    assert "Source" in results["tables"]["families"]


# --------------------------------------------------------------------------------------------- whole series


def test_expert_finds_a_planted_spike_and_level_shift_on_the_whole_timeline(tmp_path):
    x, truth = planted()
    stamps = [str(1_600_000_000 + 60 * k) for k in range(N)]
    path = timeeval_file(tmp_path / "planted.csv", x, truth, stamps=stamps)
    out, record = run_series(tmp_path, "baseline:expert", path, "--stride", "600")
    offsets = series_io.window_starts(N, 1000, 600)
    assert offsets[-1] == N - 1000 and [w["offset"] for w in record["windows"]] == offsets
    # Several overlapping windows see each anomaly; merged, they are exactly the planted ones.
    assert sum(1 for o in offsets if o <= SPIKE < o + 1000) >= 2
    assert record["intervals"] == truth == record["truth"]
    assert record["timestamps"] == [[stamps[SPIKE], stamps[SPIKE]], [stamps[SHIFT[0]], stamps[SHIFT[1] - 1]]]
    assert record["scores"] == pytest.approx(dict.fromkeys(["aff_p", "aff_r", "aff_f1", "pw_p", "pw_r", "pw_f1"], 1.0))
    for w in record["windows"][1:3]:  # a window's own answer is the detector's on that window's plot
        window = np.round(series_io.normalise_window(x[w["offset"]:w["offset"] + 1000]), 5)
        assert w["intervals"] == baselines.detect(window)[0] == series_io.cut_intervals(truth, w["offset"], 1000)
    # beside the trivial baselines, run through the same windows and merge
    assert set(record["baselines"]) == {"baseline-empty", "baseline-full", "baseline-random"}
    full = localization_scores([[0, N]], truth, N)
    assert record["baselines"]["baseline-full"] == pytest.approx(vars(full))
    assert record["baselines"]["baseline-empty"]["aff_f1"] == 0.0
    tables = open(os.path.join(out, "tables.md")).read()
    assert "| baseline-expert | 1 | 100.0 | 100.0 | 100.0 | 100.0 |" in tables
    assert "baseline-random" in tables and "per-source file" in tables
    with Image.open(os.path.join(out, "series", "planted", "series.png")) as img:
        assert img.size[0] == plots.SERIES_FIG_WIDTH and img.size[1] > plots.SERIES_FIG_HEIGHT
        pixels = np.asarray(img.convert("RGB"))
    plot = pixels[-plots.SERIES_FIG_HEIGHT:]
    column = int(data_gen.x_to_pixel((SHIFT[0] + SHIFT[1]) / 2, N, plots.SERIES_FIG_WIDTH))
    shaded = {tuple(p) for p in plot[10:-30, column]}
    assert any(p[1] > p[0] and p[1] > p[2] for p in shaded)  # the truth's green band
    assert any(p[0] > 200 and p[2] < 200 for p in shaded)  # the prediction's orange band
    assert len(data_gen.load_samples(os.path.join(out, "windows"))) == len(offsets)


@pytest.mark.parametrize("name", ["empty", "full", "random"])
def test_trivial_baselines_on_a_whole_series(tmp_path, name):
    x, truth = planted()
    path = timeeval_file(tmp_path / "p.csv", x, truth)
    _, record = run_series(tmp_path, f"baseline:{name}", path, "--window", "2000", "--stride", "2000")
    merged = record["intervals"]
    if name == "empty":
        assert merged == []
    elif name == "full":
        assert merged == [[0, N]]
    else:  # 1..3 windows of at most 0.1 L in each of the 3 windows, merged
        assert 1 <= len(merged) <= 9 and all(0 <= s < e <= N for s, e in merged)
        assert merged == series_io.merge_windows([(w["offset"], w["intervals"]) for w in record["windows"]], N)
    assert record["scores"] == pytest.approx(vars(localization_scores(merged, truth, N)))
    assert f"baseline-{name}" not in record["baselines"] and len(record["baselines"]) == 2


def test_unlabelled_series_gets_intervals_but_no_scores(tmp_path):
    x, _ = planted()
    path = write(tmp_path / "u.csv", csv_text(None, [x]))
    out, record = run_series(tmp_path, "baseline:expert", path, "--window", "1000", "--stride", "1000")
    assert record["intervals"] == [[SPIKE, SPIKE + 1], list(SHIFT)]
    assert record["truth"] is None and record["scores"] is None and record["timestamps"] is None
    assert record["baselines"] == {}
    results = strict_json(os.path.join(out, "results.json"))
    assert results["summary"]["n_labelled"] == 0 and results["summary"]["aff_f1"] is None


def test_a_tiny_run_folder_on_a_series(tmp_path, tiny_policy):
    import torch

    from timerpo.checkpoint import save_checkpoint
    from timerpo.prompt import parse_completion

    run = str(tmp_path / "run")
    os.makedirs(run)
    save_checkpoint(run, 1, tiny_policy, torch.optim.AdamW(tiny_policy.model.parameters()))
    x, truth = planted()
    path = timeeval_file(tmp_path / "p.csv", x[:1500], [[SPIKE, SPIKE + 1]])
    out, record = run_series(tmp_path, run, path, "--max-new-tokens", "6", "--device", "cpu")
    assert [w["offset"] for w in record["windows"]] == [0, 500]
    completions = [r["completion"] for r in load_jsonl(os.path.join(out, "predictions.jsonl"))]
    parsed = [parse_completion(c, 1000).intervals for c in completions]
    assert [w["unparsable"] for w in record["windows"]] == [p is None for p in parsed]
    expected = series_io.merge_windows([(o, p or []) for o, p in zip([0, 500], parsed)], 1500)
    assert record["intervals"] == expected and record["tag"] == "run"


# --------------------------------------------------------------------------------------------- bad input


def bad_inputs(tmp):
    """(case, input path, extra flags, expected message part) for every refusal."""
    x = noise(300)
    t = list(range(300))
    cases = [
        ("no numeric column", write(tmp / "a.csv", csv_text(["timestamp", "comment"], [t, ["hi"] * 300])), [],
         "no numeric value column"),
        ("several columns", write(tmp / "b.csv", csv_text(["value-0", "value-1"], [x, x])), [],
         "several value columns"),
        ("non-numeric cell", write(tmp / "c.csv", "value\n" + "\n".join(
            [str(v) for v in x[:5]] + ["abc"] + [str(v) for v in x[5:]]) + "\n"), [], "c.csv:7 column value: 'abc'"),
        ("infinite cell", write(tmp / "c2.csv", "value\n" + "\n".join([str(v) for v in x] + ["inf"]) + "\n"), [],
         "not a finite number"),
        ("only gaps", write(tmp / "d.csv", "value\n" + "nan\n" * 299 + "1.0\n"), [], "fewer than two numbers"),
        ("constant", write(tmp / "e.csv", csv_text(["value"], [[2.5] * 300])), [], "constant (every value is 2.5)"),
        ("shorter than a window", write(tmp / "f.csv", csv_text(["value"], [x])), [],
         "300 points, shorter than one window (--window 1000); pass --window 300 or less"),
        ("label outside", write(tmp / "g.csv", csv_text(["timestamp", "value"], [t, x])),
         ["--labels", write(tmp / "g.json", json.dumps({"g.csv": [[250, 320]]})), "--window", "100"],
         "label window [250, 320] lies outside the series (0 .. 299)"),
        ("labels overlap", write(tmp / "h.csv", csv_text(["timestamp", "value"], [t, x])),
         ["--labels", write(tmp / "h.json", json.dumps({"h.csv": [[50, 60], [10, 20], [55, 70]]})),
          "--window", "100"], "label windows [50, 60] and [55, 70] overlap"),
        ("no labels entry", write(tmp / "i.csv", csv_text(["timestamp", "value"], [t, x])),
         ["--labels", write(tmp / "i.json", json.dumps({"other.csv": []})), "--window", "100"], "has no entry"),
        ("labels without timestamps", write(tmp / "j.csv", csv_text(["value"], [x])),
         ["--labels", write(tmp / "j.json", json.dumps({"j.csv": []})), "--window", "100"],
         "no timestamp column"),
        ("bad label value", write(tmp / "k.out", csv_text(None, [x, [0] * 299 + [2]])), ["--window", "100"],
         "must hold 0 or 1, got '2'"),
        ("header in an .out file", write(tmp / "l.out", "value,label\n" + csv_text(None, [x, [0] * 300])),
         ["--window", "100"], "no header line"),
        ("headerless columns", write(tmp / "m.csv", csv_text(None, [t, x])), ["--window", "100"], "no header line"),
        ("unknown column", write(tmp / "n.csv", csv_text(["value"], [x])), ["--column", "v", "--window", "100"],
         "no column named 'v'"),
        ("ragged row", write(tmp / "o.csv", "timestamp,value\n1,2\n2\n"), [], "o.csv:3: 1 cells, expected 2"),
        ("stride beyond the window", write(tmp / "p.csv", csv_text(["value"], [x])),
         ["--window", "100", "--stride", "101"], "--stride 101 must be between 1 and the window"),
        ("window too short", write(tmp / "q.csv", csv_text(["value"], [x])), ["--window", "32"],
         "at least 64 points"),
        ("unsupported file", write(tmp / "r.txt", "1\n2\n"), [], "unsupported file type"),
    ]
    return cases


def test_every_bad_input_gets_one_line_and_writes_nothing(tmp_path, capsys):
    for case, path, extra, message in bad_inputs(tmp_path / "in"):
        for tool in ("data_gen", "eval"):
            out = tmp_path / f"out-{tool}"
            if tool == "data_gen":
                rc = data_gen.main(["--suite", "series", "--input", path, "--out", str(out), "--no-progress",
                                    *extra])
            else:
                rc = ev.main(["--model", "baseline:empty", "--series", path, "--out", str(out), "--no-progress",
                              *extra])
            err = capsys.readouterr().err.strip()
            assert rc == 2, (case, tool)
            assert len(err.splitlines()) == 1 and "error:" in err and message in err, (case, tool, err)
            assert "Traceback" not in err and not out.exists(), (case, tool)


def test_a_folder_is_one_import_but_not_one_series(tmp_path, capsys):
    folder = tmp_path / "in"
    write(folder / "a.csv", csv_text(["value"], [noise(200)]))
    write(folder / "a.out", csv_text(None, [noise(200), [0] * 200]))
    assert data_gen.main(["--suite", "series", "--input", str(folder), "--window", "100", "--out",
                          str(tmp_path / "o"), "--no-progress"]) == 2
    assert "same name 'a'" in capsys.readouterr().err
    assert ev.main(["--model", "baseline:empty", "--series", str(folder), "--window", "100", "--out",
                    str(tmp_path / "e")]) == 2
    assert "same name 'a'" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags, message", [
    (["--series", "s.csv", "--limit", "3"], "--limit does not apply to --series"),
    (["--data", "d", "--window", "100"], "--window: only with --series"),
    (["--data", "d", "--series", "s.csv"], "not allowed with argument"),
])
def test_series_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.parse_args(["--model", "baseline:empty", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_data_gen_series_flags_need_the_series_suite(capsys):
    with pytest.raises(SystemExit):
        data_gen.parse_args(["--out", "o", "--input", "x.csv"])
    assert "--input: only with --suite series" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data_gen.parse_args(["--out", "o", "--suite", "series"])
    assert "needs --input" in capsys.readouterr().err
