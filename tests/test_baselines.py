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
