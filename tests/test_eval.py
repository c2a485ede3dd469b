"""eval.py: paper-layout grouping, the four baselines end to end on tiny generated sets, a tiny-model smoke run,
and the error paths. Oracles are computed here from samples.jsonl directly, not from eval.py's own tables."""
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data_gen
import eval as ev
from timerpo import plots
from timerpo import evaluate
from timerpo.evaluate import score_prediction
from timerpo.prompt import ANOMALY_LABELS, format_completion, parse_completion

L = 100


def fake_sample(family, intervals, k=0):
    label = data_gen.FAMILY_LABEL[family] if intervals else "normal"
    return data_gen.Sample(id=f"t-{family}-{k}", family=family, label=label, length=L, intervals=intervals,
                           series=[0.0] * L, image="images/none.png", expcot="", gencot="")


def scored(family, score, k):
    """A prediction whose affiliation F1 is exactly `score` (1: empty vs empty; 0: a window on a normal series)."""
    sample = fake_sample(family, [], k)
    text = format_completion("r", [] if score == 1 else [[0, 5]], "normal")
    return score_prediction(sample, text)


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def strict_json(path):
    """JSON without NaN/Infinity (Python's json would accept them silently)."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------
# Paper layout


def test_paper_groups_are_family_means_and_avg_is_their_plain_mean():
    plan = {"freq": [1], "noisy-freq": [0], "trend": [1, 1], "flat-trend": [0], "noisy-trend": [1],
            "range": [0], "point": [1, 1, 1], "noisy-point": [0]}
    preds = [scored(f, v, k) for f, vs in plan.items() for k, v in enumerate(vs)]
    summary, rows = ev.build_summary(preds, "anomllm")
    expected = {"Frequency": 1 / 2, "Trend": 3 / 4, "Range": 0.0, "Point": 3 / 4}
    assert summary["groups"] == pytest.approx(expected)
    assert summary["avg_group_f1"] == pytest.approx(0.5)  # (0.5 + 0.75 + 0 + 0.75) / 4
    assert summary["aff_f1"] == pytest.approx(7 / 11)  # the series-weighted mean differs
    table = ev.headline_table("m", "anomllm", summary, rows)
    header, _, row = table.splitlines()
    assert header == "| Method | Cls Acc | Frequency | Trend | Range | Point | Avg F1 | Loc gain | PW-F1 anom. |"
    # Every series is normal and every class "normal", whose class window is []: that scores 1 everywhere, so
    # the windows answered beside "normal" cost 50 points of gain. Nothing is anomalous: no PW-F1 anom.
    assert row == "| m | 100.0 | 50.0 | 75.0 | 0.0 | 75.0 | 50.0 | -50.0 | – |"


def test_tods_has_no_paper_groups_and_averages_types():
    plan = {"global": [1, 0], "contextual": [1], "seasonal": [0], "trend": [1, 1, 1], "shapelet": [0, 0]}
    preds = [scored(f, v, k) for f, vs in plan.items() for k, v in enumerate(vs)]
    summary, rows = ev.build_summary(preds, "tods")
    assert summary["groups"] == {} and summary["avg_group_f1"] is None
    assert summary["avg_type_f1"] == pytest.approx((0.5 + 1 + 0 + 1 + 0) / 5)
    assert all(r["group"] is None for r in rows)
    header = ev.headline_table("m", "tods", summary, rows).splitlines()[0]
    assert header == ("| Method | Cls Acc | global | contextual | seasonal | trend | shapelet | Avg F1 | Loc gain "
                      "| PW-F1 anom. |")
    assert summary["avg_f1"] == pytest.approx(summary["avg_type_f1"])


def test_balanced_indices_round_robin_against_brute_force():
    families = ["a"] * 5 + ["b"] * 2 + ["c"] * 4
    samples = [fake_sample("range", [], k) for k in range(len(families))]
    for s, f in zip(samples, families):
        s.family = f
    for n in range(1, len(families) + 1):
        got = data_gen.balanced_indices(samples, n)
        counts = Counter(families[i] for i in got)
        assert len(got) == n == len(set(got))
        # Brute force: each family gets min(size, level) where the level is the smallest that reaches n.
        sizes = Counter(families)
        level = next(t for t in range(n + 1) if sum(min(sz, t) for sz in sizes.values()) >= n)
        for fam, size in sizes.items():
            assert min(size, level - 1) <= counts[fam] <= min(size, level)
        # within a family the earliest rows are taken
        for fam in sizes:
            rows = [i for i, f in enumerate(families) if f == fam]
            assert [i for i in got if families[i] == fam] == rows[:counts[fam]]


def test_model_tag_names():
    assert ev.model_tag("baseline:empty") == "baseline-empty"
    assert ev.model_tag("runs/tiny-timerpo/ckpt-000060/model") == "tiny-timerpo-ckpt-000060"
    assert ev.model_tag("qwen2.5-vl-3b", 0.4) == "qwen2.5-vl-3b-t0.4"
    assert ev.default_out("tiny", "data/test/", 0.0) == os.path.join("runs", "eval", "tiny-test")


def test_random_windows_follow_the_recipe():
    widths, counts = [], []
    for seed in range(300):
        windows = ev.random_windows(1000, np.random.default_rng(seed))
        counts.append(len(windows))
        for s, e in windows:
            assert 0 <= s < e <= 1000
            widths.append(e - s)
    assert set(counts) == {1, 2, 3}
    assert min(widths) >= 5 and max(widths) <= 100 and max(widths) > 90
    # A short series still gets valid windows: width 5 is the floor even when 0.1 L is smaller.
    for seed in range(50):
        for s, e in ev.random_windows(12, np.random.default_rng(seed)):
            assert 0 <= s < e <= 12 and e - s == 5


def test_majority_label_ties_follow_label_order():
    samples = [fake_sample("trend", [[1, 3]], 0), fake_sample("freq", [[1, 3]], 1), fake_sample("range", [], 2)]
    assert ev.majority_anomaly_label(samples) == "seasonal"  # tie 1:1, seasonal comes before trend
    assert ev.majority_anomaly_label([fake_sample("range", [], 0)]) == ANOMALY_LABELS[0]


# ---------------------------------------------------------------------------------------------------
# Baselines end to end


@pytest.fixture(scope="module")
def anomllm_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("eval") / "anom")
    data_gen.generate(folder, "anomllm", 3, 5, progress=False, workers=1)
    return folder


@pytest.fixture(scope="module")
def tods_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("eval") / "tods")
    data_gen.generate(folder, "tods", 2, 5, progress=False, workers=1)
    return folder


def run_eval(model, data, out, *extra):
    rc = ev.main(["--model", model, "--data", data, "--out", str(out), "--no-progress", *extra])
    assert rc == 0
    results = strict_json(os.path.join(out, "results.json"))
    records = load_jsonl(os.path.join(out, "predictions.jsonl"))
    with Image.open(os.path.join(out, "gallery.png")) as img:
        assert img.size[0] > 1000 and img.size[1] > 200
    assert os.path.isfile(os.path.join(out, "tables.md"))
    return results, records


def truth(data):
    return load_jsonl(os.path.join(data, "samples.jsonl"))


def test_empty_baseline_scores_the_normal_share(anomllm_dir, tmp_path):
    results, records = run_eval("baseline:empty", anomllm_dir, tmp_path / "out")
    rows = truth(anomllm_dir)
    assert len(records) == len(rows) == results["summary"]["n"]
    trend_rows = [r for r in rows if r["family"] in ("trend", "flat-trend", "noisy-trend")]
    share_trend = sum(not r["intervals"] for r in trend_rows) / len(trend_rows)
    share_all = sum(not r["intervals"] for r in rows) / len(rows)
    assert results["summary"]["groups"]["Trend"] == pytest.approx(share_trend)
    assert results["summary"]["cls_acc"] == pytest.approx(share_all)
    assert results["summary"]["unparsable"] == 0
    for rec, row in zip(records, rows):
        assert rec["id"] == row["id"] and rec["gt_intervals"] == row["intervals"]
        assert rec["parsed"]["intervals"] == [] and rec["parsed"]["label"] == "normal"
        assert rec["loc"]["aff_f1"] == (1.0 if not row["intervals"] else 0.0)


def test_full_baseline_recall_is_one_and_precision_is_coverage(anomllm_dir, tmp_path):
    results, records = run_eval("baseline:full", anomllm_dir, tmp_path / "out")
    rows = truth(anomllm_dir)
    majority = Counter(r["label"] for r in rows if r["intervals"]).most_common()
    best = max(c for _, c in majority)
    assert results["baseline"]["full_label"] in {lab for lab, c in majority if c == best}
    label = results["baseline"]["full_label"]
    assert results["summary"]["cls_acc"] == pytest.approx(sum(r["label"] == label for r in rows) / len(rows))
    for rec, row in zip(records, rows):
        assert rec["parsed"]["intervals"] == [[0, row["length"]]]
        if row["intervals"]:
            covered = sum(e - s for s, e in row["intervals"]) / row["length"]
            assert rec["loc"]["pw_r"] == 1.0 and rec["loc"]["aff_r"] == pytest.approx(1.0)
            assert rec["loc"]["pw_p"] == pytest.approx(covered)
        else:
            assert rec["loc"]["aff_f1"] == 0.0


def test_random_baseline_is_seeded_per_series(anomllm_dir, tmp_path):
    _, records = run_eval("baseline:random", anomllm_dir, tmp_path / "a", "--seed", "3")
    _, subset = run_eval("baseline:random", anomllm_dir, tmp_path / "b", "--seed", "3", "--limit", "8")
    _, other = run_eval("baseline:random", anomllm_dir, tmp_path / "c", "--seed", "4")
    by_id = {r["id"]: r["completion"] for r in records}
    assert len(subset) == 8 and len({r["family"] for r in subset}) == 8  # one per family
    assert all(by_id[r["id"]] == r["completion"] for r in subset)
    assert any(by_id[r["id"]] != r["completion"] for r in other)
    for rec in records:
        assert 1 <= len(rec["parsed"]["intervals"]) <= 3 and rec["parsed"]["label"] in ANOMALY_LABELS


def test_expert_baseline_reports_the_detector(anomllm_dir, tmp_path):
    import baselines

    results, records = run_eval("baseline:expert", anomllm_dir, tmp_path / "out")
    rows = {r["id"]: r for r in truth(anomllm_dir)}
    for rec in records[::5]:
        intervals, label, _ = baselines.detect(np.asarray(rows[rec["id"]]["series"], dtype=float))
        assert rec["parsed"]["label"] == label
        assert rec["parsed"]["intervals"] == [list(iv) for iv in intervals]
    hits = sum(r["parsed"]["label"] == r["label"] for r in records)
    assert results["summary"]["cls_acc"] == pytest.approx(hits / len(records))
    assert set(results["summary"]["groups"]) == {"Frequency", "Trend", "Range", "Point"}


def test_tods_suite_reports_types_with_shapelet(tods_dir, tmp_path):
    results, records = run_eval("baseline:empty", tods_dir, tmp_path / "out")
    assert results["suite"] == "tods" and results["summary"]["groups"] == {}
    assert [r["family"] for r in results["families"]] == list(data_gen.TODS_TYPES)
    assert "shapelet" in results["tables"]["headline"]
    rows = truth(tods_dir)
    for fam_row in results["families"]:
        members = [r for r in rows if r["family"] == fam_row["family"]]
        assert fam_row["aff_f1"] == pytest.approx(sum(not r["intervals"] for r in members) / len(members))


# ---------------------------------------------------------------------------------------------------
# Oracles and localization figures

# The paper's columns, written out here rather than read from timerpo.metrics.
GROUP = {"freq": "Frequency", "noisy-freq": "Frequency", "trend": "Trend", "flat-trend": "Trend",
         "noisy-trend": "Trend", "range": "Range", "point": "Point", "noisy-point": "Point"}


def paper_avg(families, scores):
    """Plain mean over the paper groups of each group's mean score."""
    by_group = {}
    for family, score in zip(families, scores):
        by_group.setdefault(GROUP[family], []).append(score)
    return sum(sum(v) / len(v) for v in by_group.values()) / len(by_group)


def test_oracles_answer_presence_and_class_and_the_gain_links_them(anomllm_dir, tmp_path):
    presence, p_records = run_eval("baseline:presence-oracle", anomllm_dir, tmp_path / "p")
    klass, c_records = run_eval("baseline:class-oracle", anomllm_dir, tmp_path / "c")
    for p, c, row in zip(p_records, c_records, truth(anomllm_dir)):
        if row["intervals"]:
            assert p["parsed"]["intervals"] == [[0, row["length"]]] and p["parsed"]["label"] == row["label"]
            assert c["parsed"]["intervals"] == [list(evaluate.CLASS_WINDOWS[row["label"]])]  # L = 1000 here
            assert c["parsed"]["label"] == row["label"]
        else:
            for rec in (p, c):
                assert rec["parsed"]["intervals"] == [] and rec["parsed"]["label"] == "normal"
    for results, records in ((presence, p_records), (klass, c_records)):
        summary = results["summary"]
        assert summary["cls_acc"] == 1.0
        assert summary["avg_group_f1"] == pytest.approx(
            paper_avg([r["family"] for r in records], [r["loc"]["aff_f1"] for r in records]), abs=1e-12)
        anomalous = [r["loc"]["pw_f1"] for r in records if r["gt_intervals"]]
        assert summary["pw_f1_anomalous"] == pytest.approx(sum(anomalous) / len(anomalous), abs=1e-12)
        assert summary["n_anomalous"] == len(anomalous)
    # The class oracle's answers are their own class windows; the presence oracle's become the class oracle's.
    assert klass["summary"]["loc_gain"] == 0.0
    assert presence["summary"]["class_window_avg_f1"] == pytest.approx(klass["summary"]["avg_group_f1"], abs=1e-12)
    assert presence["summary"]["loc_gain"] == pytest.approx(
        presence["summary"]["avg_group_f1"] - klass["summary"]["avg_group_f1"], abs=1e-12)
    assert "Loc gain" in presence["tables"]["headline"]


def test_class_window_scales_the_stored_windows():
    w = evaluate.CLASS_WINDOWS
    assert set(w) == set(ANOMALY_LABELS) - {"shapelet"} | {evaluate.ANY_ANOMALY}
    for s, e in w.values():
        assert 0 <= s < e <= evaluate.CLASS_WINDOW_LENGTH == 1000
    assert evaluate.class_window("trend", 1000) == [list(w["trend"])]
    assert evaluate.class_window("shapelet", 1000) == [list(w[evaluate.ANY_ANOMALY])]
    s, e = w["seasonal"]
    assert evaluate.class_window("seasonal", 400) == [[round(s * 0.4), round(e * 0.4)]]
    assert evaluate.class_window("normal", 400) == []
    assert evaluate.class_window(None, 400) is None and evaluate.class_window("bogus", 400) is None


def test_localization_gain_by_hand():
    """Six answers at L = 100, each case of the replacement; the expected Avg F1s are computed here."""
    from timerpo.metrics import localization_scores

    def window(label):  # the stored window of a class at L = 100, written out
        s, e = evaluate.CLASS_WINDOWS.get(label, evaluate.CLASS_WINDOWS[evaluate.ANY_ANOMALY])
        return [[round(s / 10), round(e / 10)]]

    cases = [  # family, truth, answer text, the intervals scored after replacement
        ("point", [[10, 15]], format_completion("r", [[10, 15]], "contextual point"), window("contextual point")),
        ("freq", [[40, 60]], format_completion("r", [[0, 30]], "trend"), window("trend")),  # the class answered
        ("trend", [], format_completion("r", [], "normal"), []),
        ("range", [[70, 80]], "no answer here", None),  # unparsable stays unparsable
        ("noisy-point", [[5, 9]], "<think>r</think><answer>[[5, 9]]</answer>", [[5, 9]]),  # no class: kept
        ("flat-trend", [[50, 100]], format_completion("r", [[50, 100]], "shapelet"), window("shapelet")),
    ]
    preds, before, after = [], [], []
    for k, (family, gt, text, replaced) in enumerate(cases):
        sample = data_gen.Sample(id=f"h-{k}", family=family, label=data_gen.FAMILY_LABEL[family] if gt else "normal",
                                 length=100, intervals=gt, series=[0.0] * 100, image="", expcot="", gencot="")
        preds.append(score_prediction(sample, text))
        answer = parse_completion(text, 100).intervals
        before.append(0.0 if answer is None else localization_scores(answer, gt, 100).aff_f1)
        after.append(0.0 if replaced is None else localization_scores(replaced, gt, 100).aff_f1)
    families = [c[0] for c in cases]
    summary = evaluate.summarize(preds)
    assert summary["avg_f1"] == pytest.approx(paper_avg(families, before), abs=1e-12)
    assert summary["class_window_avg_f1"] == pytest.approx(paper_avg(families, after), abs=1e-12)
    assert summary["loc_gain"] == pytest.approx(paper_avg(families, before) - paper_avg(families, after), abs=1e-12)
    assert summary["n_anomalous"] == 5
    assert summary["distinct_intervals"] == 5  # [[10, 15]], [[0, 30]], [], [[5, 9]], [[50, 100]]; not the unparsable


# ---------------------------------------------------------------------------------------------------
# Model path and errors


def test_tiny_model_smoke_counts_unparsable(anomllm_dir, tmp_path):
    results, records = run_eval("tiny", anomllm_dir, tmp_path / "out", "--limit", "4", "--max-new-tokens", "6",
                                "--batch-size", "3")
    assert len(records) == 4
    # Re-parse every completion independently: the count in results.json must match.
    unparsable = sum(parse_completion(r["completion"], r["length"]).intervals is None for r in records)
    assert unparsable > 0  # 6 random tokens cannot close an answer block
    assert results["summary"]["unparsable"] == unparsable == sum(r["unparsable"] for r in records)
    for r in records:
        if r["unparsable"]:
            assert r["loc"]["aff_f1"] == 0.0 and r["reward"]["loc"] == 0.0


def test_missing_model_exits_2_with_one_sentence(anomllm_dir, tmp_path, capsys):
    rc = ev.main(["--model", str(tmp_path / "no-such-model"), "--data", anomllm_dir, "--out", str(tmp_path / "o"),
                  "--no-progress", "--limit", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "no-such-model" in err and len(err.splitlines()) == 1


def test_missing_data_exits_2(tmp_path, capsys):
    rc = ev.main(["--model", "baseline:empty", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing" in err and "samples.jsonl" in err


@pytest.mark.parametrize("flags", [["--model", "baseline:median"], ["--model", "tiny", "--limit", "0"],
                                   ["--model", "tiny", "--temperature", "-1"],
                                   ["--model", "tiny", "--batch-size", "0"]])
def test_bad_flags_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.parse_args(flags + ["--data", "x"])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_gallery_survives_odd_completions(anomllm_dir):
    samples = data_gen.load_samples(anomllm_dir, limit=3)
    texts = ["\x00\u202e<think>" + "é漢字 " * 200 + "</think><answer>nope</answer>", "", "<answer>[[5, 999999]]"]
    preds = [score_prediction(s, t) for s, t in zip(samples, texts)]
    img = plots.draw_gallery(preds, anomllm_dir, "anomllm", "odd")
    assert img.size[1] > 3 * 100 / 2
    assert sum(p.parsed.intervals is None for p in preds) == 3


def test_expert_texts_do_not_depend_on_workers(anomllm_dir):
    samples = data_gen.load_samples(anomllm_dir, limit=6)
    assert ev.expert_texts(samples, workers=2) == ev.expert_texts(samples, workers=1)


def test_run_folder_resolves_to_its_latest_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "ckpt-000007"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "run" / "latest").write_text("ckpt-000007\n")
    assert ev.resolve_model(str(tmp_path / "run")) == str(ckpt / "model")
    assert ev.resolve_model("qwen2.5-vl-3b") == "qwen2.5-vl-3b"


def test_run_folder_is_scored_at_its_own_completion_cap(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text('{"max_new_tokens": 72, "model": "tiny"}')
    assert ev.parse_args(["--model", str(run), "--data", "d"]).max_new_tokens == 72
    assert ev.parse_args(["--model", str(run), "--data", "d", "--max-new-tokens", "9"]).max_new_tokens == 9
    assert ev.parse_args(["--model", "tiny", "--data", "d"]).max_new_tokens == 72
    assert ev.parse_args(["--model", str(tmp_path), "--data", "d"]).max_new_tokens == 1024  # a plain folder
