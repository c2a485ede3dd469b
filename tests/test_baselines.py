"""baselines: the classical blind detector and its two localising scans."""
import numpy as np
import pytest

import baselines
import data_gen as dg
from tests.test_expert_cot import check_trace_numbers


def test_frequency_scan_and_cycle_residual_locate_breaks():
    f = np.full(1000, 0.03)
    f[400:420] = 0.09
    fr = baselines.frequency_scan(np.sin(2 * np.pi * np.cumsum(f)), 1000 / 30, light=False)
    assert len(fr.steady) == 1 and abs(fr.steady[0][0] - 400) <= 2 and abs(fr.steady[0][1] - 420) <= 2
    assert np.median(fr.ratio[402:418]) == pytest.approx(3.0, rel=0.1)
    x = np.sin(2 * np.pi * np.arange(300) / 25)
    x[100] = 2.0
    res = baselines.cycle_residual(x, 25, min_len=1)
    assert res.intervals == [[100, 101]] and res.residual[100] == pytest.approx(2.0 - x[75])


def test_every_quoted_number_in_detect_traces():
    for family in ("noisy-point", "freq", "flat-trend"):
        x, _ = dg.make_series("anomllm", family, 1, 42)
        x = np.round(x, 5)
        intervals, _, trace = baselines.detect(x)
        check_trace_numbers(trace, x, intervals)


def test_detect_is_blind_and_deterministic():
    import inspect

    assert list(inspect.signature(baselines.detect).parameters) == ["series"]
    x, _ = dg.make_series("anomllm", "noisy-freq", 4, 42)
    a, b = baselines.detect(x), baselines.detect(x.copy())
    assert a == b
    for s, e in a[0]:
        assert 0 <= s < e <= len(x)


@pytest.mark.parametrize("family,label", [("range", "global point"), ("point", "contextual point"),
                                          ("freq", "seasonal"), ("trend", "trend")])
def test_detect_finds_clear_anomalies(family, label):
    hits = 0
    for i in range(40):
        x, iv = dg.make_series("anomllm", family, i, 42)
        if not iv:
            continue
        got, got_label, _ = baselines.detect(np.round(x, 5))
        overlap = any(s < e2 and s2 < e for s, e in iv for s2, e2 in got)
        hits += got_label == label and overlap
        if hits >= 3:
            break
    assert hits >= 3


def test_detect_calls_clean_series_normal():
    t = np.arange(1000)
    for x in (np.sin(2 * np.pi * 0.03 * t), np.sin(2 * np.pi * 0.02 * t) + 0.002 * t,
              np.random.default_rng(3).normal(0, 0.1, 1000)):
        intervals, label, trace = baselines.detect(x)
        assert (intervals, label) == ([], "normal")
        assert trace.endswith("intervals [].")


# ---------------------------------------------------------------------------------------------------
# The class oracle's window search


def exhaustive_best(truths, length):
    """Brute force: the best mean affiliation F1 over every window [s, e), 0 <= s < e <= length."""
    from timerpo.metrics import localization_scores

    return max(sum(localization_scores([(s, e)], gt, length).aff_f1 for gt in truths) / len(truths)
               for s in range(length) for e in range(s + 1, length + 1))


def random_truths(rng, length, n):
    """n series of 1-2 random true intervals each (the second may touch or overlap the first)."""
    out = []
    for _ in range(n):
        ivs = []
        for _ in range(int(rng.integers(1, 3))):
            s = int(rng.integers(0, length - 2))
            ivs.append([s, int(rng.integers(s + 1, min(length, s + length // 3) + 1))])
        out.append(sorted(ivs))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_search_finds_the_exhaustive_optimum(seed):
    length = 48
    truths = random_truths(np.random.default_rng(seed), length, 5)
    fit = baselines.best_window(truths, length, step=12, seeds=3)
    assert fit.n == 5 and 0 <= fit.window[0] < fit.window[1] <= length
    assert fit.score == pytest.approx(baselines.mean_window_f1(fit.window, truths, length), abs=0)
    assert fit.score == pytest.approx(exhaustive_best(truths, length), abs=1e-12)


def test_window_search_with_workers_is_the_same_search():
    truths = random_truths(np.random.default_rng(5), 40, 4)
    alone = baselines.best_window(truths, 40, step=10)
    with baselines.multiprocessing.get_context("fork").Pool(2) as pool:
        shared = baselines.best_window(truths, 40, step=10, pool=pool, workers=2)
    assert shared == alone


def sample(label, intervals, k, length=60):
    return dg.Sample(id=f"w-{k}", family="point", label=label, length=length, intervals=intervals,
                     series=[0.0] * length, image="", expcot="", gencot="")


def test_fit_class_windows_fits_each_class_and_all_anomalies_pooled():
    from timerpo.evaluate import ANY_ANOMALY

    samples = [sample("trend", [[30, 60]], 0), sample("trend", [[40, 60]], 1), sample("seasonal", [[5, 9]], 2),
               sample("normal", [], 3), sample("trend", [], 4)]  # a trend-family series without anomaly: normal
    fits = baselines.fit_class_windows(samples, step=10)
    assert set(fits) == {"trend", "seasonal", ANY_ANOMALY}  # no series of the other classes: no window
    assert (fits["trend"].n, fits["seasonal"].n, fits[ANY_ANOMALY].n) == (2, 1, 3)
    assert fits["seasonal"].window == (5, 9) and fits["seasonal"].score == 1.0  # one series: its own interval
    assert fits["trend"].score == pytest.approx(exhaustive_best([[[30, 60]], [[40, 60]]], 60), abs=1e-12)
    with pytest.raises(ValueError, match="several lengths"):
        baselines.fit_class_windows(samples + [sample("trend", [[1, 2]], 5, length=80)])


def test_fit_command_reports_a_fresh_fit_against_the_stored_windows(tmp_path, capsys):
    folder = str(tmp_path / "d")
    dg.generate(folder, "anomllm", 2, 5, progress=False, workers=1)
    assert baselines.fit_main(["--fit-class-windows", folder, "--step", "125", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "| class | series | window | mean Aff-F1 | stored window |" in out and "DIFFER" in out
    assert baselines.fit_main(["--fit-class-windows", str(tmp_path / "missing")]) == 2
