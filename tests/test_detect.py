"""Whole-series detection beyond one file: benchmark files of every style in one `eval.py --series FOLDER`,
per-point scores and their threshold-free metrics (against hand and brute-force computations), the
`timerpo.detect` API, the README's example, and training on a labelled import.

Oracles: AUC-PR by enumerating every threshold, AUC-ROC by counting pairs, VUS from its definition written
out here in plain loops, and numbers worked out by hand in the comments.
"""
import json
import math
import os
import re
from datetime import datetime, timedelta

import numpy as np
import pytest

import data_gen
import eval as ev
import series_io
import timerpo
from tests.test_series import csv_text, flags, load_jsonl, noise, strict_json, timeeval_file, write
from timerpo import point_metrics
from timerpo.detection import coverage, window_votes
from timerpo.evaluate import score_prediction
from timerpo.prompt import format_completion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- metrics


def brute_auc_pr(scores, labels):
    """Average precision by enumerating the distinct thresholds, highest first: Σ (R_k − R_{k−1}) P_k."""
    total, recall_before = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        pred = [s >= t for s in scores]
        tp = sum(p and y for p, y in zip(pred, labels))
        recall, precision = tp / sum(labels), tp / sum(pred)
        total += (recall - recall_before) * precision
        recall_before = recall
    return total


def brute_auc_roc(scores, labels):
    """P(score of an anomaly > score of a normal point), ties counted half: the ROC area by pairs."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def brute_vus(scores, labels, window):
    """(VUS-PR, VUS-ROC) from the definition, in plain loops, for fewer than 250 points (every sorted score is
    then one of the 250 threshold ranks). For each buffer ℓ = 0..window, the ℓ // 2 points before and after
    each anomaly weigh w = sqrt(1 − d / ℓ) at distance d (summed, at most 1, where buffers meet), and the
    anomalies with their buffers form extended ranges (joined where they overlap). At threshold t, with P
    anomalous points and the predicted points p:
        TP = Σ_{j in p} weight_j,  P' = (2 P + Σ_{j in p, buffer} w_j) / 2,  recall = min(TP / P', 1),
        TPR = recall × (share of extended ranges holding a predicted point),
        FPR = (|p| − TP) / (N − P'),  precision = TP / |p|.
    ROC: trapezoids from (0, 0) through the thresholds to (1, 1); PR: Σ ΔTPR × precision. VUS: the mean over ℓ.
    """
    n = len(scores)
    labels = [int(y) for y in labels]
    segments, k = [], 0
    while k < n:  # anomalies as inclusive [s, e]
        if labels[k]:
            s = k
            while k + 1 < n and labels[k + 1]:
                k += 1
            segments.append((s, k))
        k += 1
    anomalies = sum(labels)
    order = sorted(scores, reverse=True)
    thresholds = [order[int(i)] for i in np.linspace(0, n - 1, point_metrics.VUS_THRESHOLDS).astype(int)]
    pr_areas, roc_areas = [], []
    for ell in range(window + 1):
        weight = [float(y) for y in labels]
        for s, e in segments:
            for d in range(1, ell // 2 + 1):
                for j in (s - d, e + d):
                    if 0 <= j < n and not labels[j]:
                        weight[j] = min(1.0, weight[j] + math.sqrt(1 - d / ell))
        extended = []  # anomalies with their buffers, joined where they touch
        for s, e in segments:
            lo, hi = max(0, s - ell // 2), min(n - 1, e + ell // 2)
            if extended and lo <= extended[-1][1]:
                extended[-1] = (extended[-1][0], hi)
            else:
                extended.append((lo, hi))
        tpr, fpr, prec = [0.0], [0.0], [1.0]
        for t in thresholds:
            pred = [x >= t for x in scores]
            tp = sum(weight[j] for j in range(n) if pred[j])
            in_buffer = sum(weight[j] for j in range(n) if pred[j] and not labels[j])
            p_new = (2 * anomalies + in_buffer) / 2
            hit = sum(any(pred[lo:hi + 1]) for lo, hi in extended) / len(extended)
            tpr.append(min(tp / p_new, 1) * hit)
            fpr.append((sum(pred) - tp) / (n - p_new))
            prec.append(tp / sum(pred))
        tpr.append(1.0)
        fpr.append(1.0)
        roc_areas.append(sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1)))
        pr_areas.append(sum((tpr[i] - tpr[i - 1]) * prec[i] for i in range(1, len(prec))))
    return sum(pr_areas) / len(pr_areas), sum(roc_areas) / len(roc_areas)


# 8 points, one anomaly at index 2 and 3; scores rank 2 (0.9), 4 (0.8), 3 (0.3), 1 (0.2), ...
HAND_LABELS = [0, 0, 1, 1, 0, 0, 0, 0]
HAND_SCORES = [0.1, 0.2, 0.9, 0.3, 0.8, 0.0, 0.05, 0.15]


def test_auc_pr_and_roc_match_the_hand_computed_case():
    # Thresholds 0.9, 0.8, 0.3 recover the anomalies at ranks 1 and 3: AP = ½·1 + ½·(2/3) = 5/6.
    # Pairs: 0.9 beats all 6 normal scores, 0.3 beats 5 of them (not 0.8): AUC-ROC = 11 / 12.
    got = point_metrics.point_metrics(HAND_SCORES, HAND_LABELS, vus_window=0)
    assert got.auc_pr == pytest.approx(5 / 6) == brute_auc_pr(HAND_SCORES, HAND_LABELS)
    assert got.auc_roc == pytest.approx(11 / 12) == brute_auc_roc(HAND_SCORES, HAND_LABELS)


@pytest.mark.parametrize("seed", range(4))
def test_auc_pr_and_roc_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(40) < 0.25).astype(int)
    labels[0], labels[1] = 1, 0
    scores = np.round(rng.random(40) + 0.5 * labels, 1)  # rounding makes ties
    got = point_metrics.point_metrics(scores, labels, vus_window=0)
    assert got.auc_pr == pytest.approx(brute_auc_pr(list(scores), list(labels)))
    assert got.auc_roc == pytest.approx(brute_auc_roc(list(scores), list(labels)))


def test_vus_matches_the_hand_computed_case():
    # ℓ = 0 is range-AUC without buffer; the thresholds are the sorted scores. 0.9 -> p = {2}: TP 1, P' = 2,
    # recall ½, the anomaly touched: TPR ½, FPR 0, precision 1. 0.8 -> {2, 4}: TPR ½, FPR 1/6, precision ½.
    # 0.3 -> {2, 3, 4}: TPR 1, FPR 1/6, precision 2/3; lower thresholds keep TPR 1. PR = ½·1 + ½·(2/3) = 5/6;
    # ROC = (1/6)·½ (height ½ up to FPR 1/6) + (5/6)·1 = 11/12.
    pr0, roc0 = point_metrics.vus(np.array(HAND_SCORES), np.array(HAND_LABELS), 0)
    assert pr0 == pytest.approx(5 / 6) and roc0 == pytest.approx(11 / 12)
    # ℓ = 2: index 1 and 4 get weight sqrt(1 − ½) = 0.7071. At 0.8, p = {2, 4}: TP = 1.7071, P' = (2 + 2 +
    # 0.7071) / 2 = 2.3536, TPR = 0.7253, precision 0.8536; at 0.3: TP = 2.7071, P' = 2.3536 → recall 1,
    # precision 0.9024; at 0.2: TP 3.4142 of 4 predicted. VUS averages ℓ = 0, 1, 2 (ℓ = 1 has no buffer).
    pr, roc = point_metrics.vus(np.array(HAND_SCORES), np.array(HAND_LABELS), 2)
    pr2_by_hand = 1.0 * 0.5 + (1.7071068 / 2.3535534 - 0.5) * (1.7071068 / 2) + (1 - 1.7071068 / 2.3535534) * (
        2.7071068 / 3)
    assert pr == pytest.approx((5 / 6 + 5 / 6 + pr2_by_hand) / 3, abs=1e-6)
    assert (pr, roc) == pytest.approx(brute_vus(HAND_SCORES, HAND_LABELS, 2))


@pytest.mark.parametrize("seed", range(3))
def test_vus_matches_its_definition_on_small_series(seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros(60, dtype=int)
    labels[10:14] = 1
    labels[40] = 1
    labels[44:47] = 1  # its buffer meets the anomaly at 40 for ℓ >= 6
    scores = np.round(rng.random(60) + 0.6 * labels, 2)
    got = point_metrics.point_metrics(scores, labels, vus_window=8)
    assert (got.vus_pr, got.vus_roc) == pytest.approx(brute_vus(list(scores), list(labels), 8))


@pytest.mark.parametrize("window", [0, 1, 2, 3, 7, 12])
def test_vus_matches_its_definition_at_the_ends_and_where_buffers_pile_up(window):
    # Anomalies on the first and last point. 5 and 8 have two normal points between them: at ℓ // 2 = 1 their
    # buffers are adjacent but stay two extended ranges, from ℓ // 2 = 2 on they overlap and join, and a point
    # between them takes weight from both (capped at 1). Scores in tenths tie often.
    labels = np.zeros(40, dtype=int)
    labels[[0, 5, 8, 12, 39]] = 1
    labels[20:23] = 1
    scores = np.round(np.random.default_rng(window).random(40) + 0.3 * labels, 1)
    assert point_metrics.vus(scores, labels, window) == pytest.approx(brute_vus(list(scores), list(labels), window))


def test_vus_examples():
    assert point_metrics.vus([0.9, 0.1, 0.8, 0.2], [1, 0, 0, 0], 0) == (1.0, 1.0)  # the docstring's
    assert point_metrics.vus([0.9, 0.1], [1, 1], 4) == (None, None)
    assert point_metrics.rank_thresholds(np.array([3.0, 1.0, 2.0]), 5).tolist() == [3, 3, 2, 2, 1]


def test_metrics_are_none_without_both_classes():
    assert point_metrics.point_metrics([0.1, 0.2], [0, 0]) == point_metrics.PointScores(None, None, None, None)
    with pytest.raises(ValueError, match="equally long"):
        point_metrics.point_metrics([0.1, 0.2], [0, 1, 0])


# --------------------------------------------------------------------------------------------- per-point scores


def test_point_score_is_the_share_of_answers_averaged_over_windows():
    sample = data_gen.Sample(id="w", family="f", label="normal", length=10, intervals=[], series=[0.0] * 10,
                             image="", expcot="", gencot="")
    answers = [score_prediction(sample, format_completion("r", iv, "trend"))
               for iv in ([[2, 6]], [[4, 8]], [[5, 6]])]
    answers.append(score_prediction(sample, "no answer at all"))  # unparsable: covers nothing
    share = coverage(answers, 10)
    assert list(share) == [0, 0, .25, .25, .5, .75, .25, .25, 0, 0]
    assert window_votes(answers, 10) == [[5, 6]]  # more than half of the 4 answers: only point 5
    # two windows of 6 at offsets 0 and 4 over 10 points: points 4, 5 are in both
    spread = series_io.spread_scores([(0, [1, 1, 1, 1, 1, 0]), (4, [0, 1, 0, 0, 0, 1])], 10)
    assert list(spread) == [1, 1, 1, 1, .5, 0.5, 0, 0, 0, 1]


def test_detection_statistic_example():
    import baselines

    x = noise(1000, 5)
    x[300] += 2.0
    stat = baselines.detection_statistic(x)
    z = (x[300] - np.median(x)) / (1.4826 * np.median(np.abs(x - np.median(x)))) / 3
    assert stat[300] == pytest.approx(z) and int(np.argmax(stat)) == 300 and stat.shape == (1000,)


# --------------------------------------------------------------------------------------------- files


def test_a_repeated_hour_places_nab_windows_row_by_row(tmp_path, capsys):
    t0 = datetime(2024, 10, 27)
    stamps = [t0 + timedelta(minutes=10 * k) for k in range(300)]
    stamps = stamps[:150] + stamps[144:150] + stamps[150:294]  # the clock goes back an hour: 6 rows repeat
    text = [s.strftime("%Y-%m-%d %H:%M:%S") for s in stamps]
    path = write(tmp_path / "nab" / "dst.csv", csv_text(["timestamp", "value"], [text, noise(300)]))
    labels = write(tmp_path / "labels.json", json.dumps({"realTraffic/dst.csv": [[text[146], text[157]]]}))
    series = series_io.read_series(path, labels_path=labels)
    # The window runs from the 146th to the 151st ten minutes: rows 146..149, their repeats 152..155 and rows
    # 156, 157 lie inside it; rows 150, 151 (the repeated 144th and 145th) do not.
    inside = [k for k, s in enumerate(stamps) if stamps[146] <= s <= stamps[157]]
    assert series.intervals == series_io.runs(np.isin(np.arange(300), inside)) == [[146, 150], [152, 158]]
    assert len(series.notes) == 1 and "6 rows have a timestamp not after an earlier row's" in series.notes[0]
    assert data_gen.main(["--suite", "series", "--input", path, "--labels", labels, "--window", "100", "--out",
                          str(tmp_path / "d"), "--no-progress"]) == 0
    assert "6 rows" in capsys.readouterr().err


def test_skip_bad_imports_the_rest_and_lists_what_it_skipped(tmp_path, capsys):
    folder = tmp_path / "in"
    timeeval_file(folder / "good.csv", noise(300), [[10, 20]])
    write(folder / "short.csv", csv_text(["value"], [noise(50)]))
    write(folder / "text.csv", csv_text(["value"], [["x"] * 300]))
    args = ["--suite", "series", "--input", str(folder), "--window", "100", "--no-progress"]
    assert data_gen.main([*args, "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["data_gen", "data_gen", "data_gen"]
    assert "short.csv: 50 points" in err[0] and "text.csv" in err[1] and "no numeric value column" in err[1]
    assert "2 of 3 files refused" in err[2] and "--skip-bad" in err[2] and not (tmp_path / "no").exists()
    assert data_gen.main([*args, "--out", str(tmp_path / "yes"), "--skip-bad"]) == 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 2  # one "skipped:" line per file
    manifest = strict_json(tmp_path / "yes" / "manifest.json")
    assert [s["name"] for s in manifest["sources"]] == ["good"]
    assert [os.path.basename(s["file"]) for s in manifest["skipped"]] == ["short.csv", "text.csv"]
    assert "no numeric value column" in manifest["skipped"][1]["reason"]


def benchmark_folder(tmp):
    """One file of each benchmark's style, each with one planted anomaly, and NAB's labels file."""
    n = 1200
    x = noise(n, 11)
    x[600:605] += 1.5
    write(tmp / "in" / "001_NAB_id_1_WebService_tr_300_1st_600.csv",  # TSB-AD-U
          csv_text(["Data", "Label"], [x, flags(n, [[600, 605]])]))
    x = noise(n, 12)
    x[900] -= 2.0
    timeeval_file(tmp / "in" / "timeeval-dip.csv", x, [[900, 901]])  # TimeEval
    t0 = datetime(2014, 4, 1)
    stamps = [(t0 + timedelta(minutes=5 * k)).strftime("%Y-%m-%d %H:%M:%S") for k in range(n)]
    x = noise(n, 13)
    x[300:310] += 1.2
    write(tmp / "in" / "nyc_taxi.csv", csv_text(["timestamp", "value"], [stamps, x]))  # NAB
    labels = write(tmp / "labels.json", json.dumps(
        {"realKnownCause/nyc_taxi.csv": [[stamps[300] + ".000000", stamps[309] + ".000000"]]}))
    x = noise(n, 14)
    x[1000:1004] += 1.0
    write(tmp / "in" / "250_UCR_Anomaly_Planted_400_1000_1004.txt", "\n".join(str(v) for v in x) + "\n")  # UCR
    write(tmp / "in" / "README.txt", "not a series\n")  # not read: no UCR name
    return str(tmp / "in"), labels


def test_a_benchmark_folder_is_one_command_with_one_summary_table(tmp_path):
    folder, labels = benchmark_folder(tmp_path)
    out = tmp_path / "out"
    assert ev.main(["--model", "baseline:expert", "--series", folder, "--labels", labels, "--window", "400",
                    "--vus-window", "4", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    results = strict_json(out / "results.json")
    files = results["files"]
    assert [f["format"] for f in files] == ["timeeval", "ucr", "nab", "timeeval"]
    assert [f["truth"] for f in files] == [[[600, 605]], [[1000, 1004]], [[300, 310]], [[900, 901]]]
    for f in files:  # the expert finds each planted anomaly exactly, beside the three trivial baselines
        assert f["rows"][0]["intervals"] == f["truth"]
        assert [r["method"] for r in f["rows"]] == ["baseline-expert", "baseline-empty", "baseline-full",
                                                    "baseline-random"]
        assert f["rows"][0]["point"]["auc_roc"] > 0.99
        scores_file = os.path.join(f["folder"], "scores.csv")
        rows = open(scores_file).read().splitlines()
        assert rows[0] == "index,timestamp,score,label" and len(rows) == 1201
        marked = [int(r.split(",")[0]) for r in rows[1:] if r.endswith(",1")]
        assert marked == list(range(*f["truth"][0]))
        assert os.path.isfile(os.path.join(f["folder"], "series.png"))
    mean = results["mean"]["baseline-expert"]
    for key in ("aff_f1", "pw_f1", "auc_pr", "auc_roc"):
        assert mean[key] == pytest.approx(np.mean([f["rows"][0]["point" if key.startswith("auc") else "scores"][key]
                                                   for f in files]))
    assert mean["files"] == 4 and results["mean"]["baseline-empty"]["aff_f1"] == 0.0
    tables = open(out / "tables.md").read()
    assert re.search(r"\| baseline-expert \| 4 \| 100\.0 \| 100\.0 \| 100\.0 \| 100\.0 \|", tables)
    assert "nyc_taxi" in tables and "250_UCR_Anomaly_Planted_400_1000_1004" in tables


def test_several_answers_per_window_give_shares(tmp_path):
    x = noise(1000, 3)
    path = timeeval_file(tmp_path / "r.csv", x, [[100, 110]])
    out = tmp_path / "o"
    assert ev.main(["--model", "baseline:random", "--series", path, "--window", "500", "--samples", "3",
                    "--vus-window", "2", "--out", str(out), "--no-progress"]) == 0
    record = strict_json(out / "series" / "r" / "intervals.json")
    assert record["samples"] == 3 and record["temperature"] == 0.4
    per_window = []
    for w in record["windows"]:
        count = np.zeros(500)
        for answer in w["samples"]:
            for s, e in answer["intervals"]:
                count[s:e] += 1
        per_window.append((w["offset"], count / 3))
    expected = series_io.spread_scores(per_window, 1000)
    scores = np.array([float(r.split(",")[2]) for r in open(out / "series" / "r" / "scores.csv").read().split()[1:]])
    assert scores == pytest.approx(expected, abs=1e-5) and 0 < scores.max() <= 1
    votes = [(o, series_io.runs(share > 0.5)) for o, share in per_window]
    assert record["intervals"] == series_io.merge_windows(votes, 1000)


# --------------------------------------------------------------------------------------------- API


def test_detect_finds_a_planted_spike():
    x = np.sin(np.arange(2500) / 6.0) + noise(2500, 2)
    x[1700] += 5.0
    found = timerpo.detect(x, model="baseline:expert", window=1000, stride=500)
    assert found.intervals == [[1700, 1701]] and found.classes == [["global point"]]
    assert found.scores.shape == (2500,) and int(np.argmax(found.scores)) == 1700
    assert found.offsets == [0, 500, 1000, 1500] and found.score_kind == "statistic"
    with pytest.raises(series_io.SeriesError, match="shorter than one window"):
        timerpo.detect(x[:500], window=1000)


def test_detect_with_a_model_answers_every_window(tiny_policy):
    x = noise(300, 4)
    found = timerpo.detect(x, model=tiny_policy, window=200, stride=100, samples=2, max_new_tokens=4)
    assert [len(a) for a in found.answers] == [2, 2]  # K answers for each of the windows at 0 and 100
    assert found.score_kind == "share" and ((found.scores >= 0) & (found.scores <= 1)).all()


def readme_block(heading):
    """The first ```python block after a README line containing `heading`."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S).group(1)


def test_the_readme_api_example_runs_as_written(capsys):
    code = readme_block("Python API")
    assert len(code.strip().splitlines()) == 5
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "[[1200, 1201]]" in printed and "global point" in printed


# --------------------------------------------------------------------------------------------- training


def test_the_tiny_model_trains_on_a_labelled_import(tmp_path):
    import train

    x = noise(600, 9)
    x[200:206] += 1.0
    path = timeeval_file(tmp_path / "plant.csv", x, [[200, 206]])
    assert data_gen.main(["--suite", "series", "--input", path, "--window", "200", "--out", str(tmp_path / "d"),
                          "--no-progress"]) == 0
    samples = data_gen.load_samples(str(tmp_path / "d"))
    assert {s.label for s in samples} == {"unknown", "normal"} and all(s.expcot for s in samples)
    data = str(tmp_path / "d")
    assert train.main(["--data", data, "--eval-data", data, "--out", str(tmp_path / "runs"), "--name", "real",
                       "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                       "--warmup-steps", "1", "--warmup-vision-steps", "0", "--eval-samples", "2",
                       "--eval-every", "2", "--save-every", "2", "--micro-batch", "4", "--rollout-batch", "4",
                       "--expcot-max-tokens", "32", "--beta", "0", "--no-progress"]) == 0
    rows = load_jsonl(tmp_path / "runs" / "real" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["reward"]) for r in rows)


def test_folders_joined_by_commas_mix_into_one_pool(tmp_path, tiny_data, tiny_policy):
    import train
    from timerpo.algorithm import make_prompt

    path = timeeval_file(tmp_path / "plant.csv", noise(400, 8), [[50, 60]])
    real = str(tmp_path / "real")
    assert data_gen.main(["--suite", "series", "--input", path, "--window", "200", "--out", real,
                          "--no-progress"]) == 0
    mixed = f"{tiny_data},{real}"
    samples = train.ensure_data(mixed, 0, False)
    assert len(samples) == len(data_gen.load_samples(tiny_data)) + len(data_gen.load_samples(real))
    assert all(os.path.isabs(s.image) and os.path.isfile(s.image) for s in samples)
    for i in (0, len(samples) - 1):  # a generated and an imported sample, read through the joined name
        assert make_prompt(tiny_policy, mixed, samples, i, "expcot").target_text == samples[i].expcot


def test_the_warm_up_needs_a_window_of_known_class():
    import train

    unknown = data_gen.Sample(id="u", family="f", label="unknown", length=100, intervals=[[1, 2]],
                              series=[0.0] * 100, image="", expcot="e", gencot="")
    config = train.parse_args(["--data", "real"])
    with pytest.raises(data_gen.DataError, match="no window of known class"):
        train.format_warmup(None, config, [unknown], progress=False)
