"""The training curves: round tick values, integer step ticks, a panel per quantity (timerpo/plots.py)."""
import pytest
from PIL import Image

from timerpo.plots import curve_panels, round_ticks, step_ticks, training_curves


def test_ticks_are_round_and_steps_are_integers():
    assert round_ticks(0, 250) == [0, 50, 100, 150, 200, 250]
    assert round_ticks(-0.03, 1.04) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert round_ticks(1e-5, 3e-5) == [1e-5, 1.5e-5, 2e-5, 2.5e-5, 3e-5]
    assert step_ticks(1, 3) == [1, 2, 3] and step_ticks(0, 7) == [0, 2, 4, 6]
    assert all(isinstance(t, int) for t in step_ticks(0, 1e6))


def logs(grounding):
    train = [{"step": s, "reward": 0.1 * s, "loss": 0.5, "kl": None if s == 1 else 0.01, "entropy": 2.0,
              "completion_len": 40, "unparsable_frac": 0.5, "zero_std_frac": 0.25, "grad_norm": 1.0,
              "adv_main_absmean": 0.8, "adv_tsr_perp_absmean": None if grounding is None else 0.3,
              "grounding_mean": grounding} for s in (1, 2, 3)]
    held = [{"step": s, "reward": 0.2, "avg_group_f1": 0.3, "cls_acc": 0.5, "loc_gain": 0.1, "unparsable": 1, "n": 4}
            for s in (0, 3)]
    return train, held


def test_every_quantity_gets_a_labelled_panel(tmp_path):
    panels = curve_panels(*logs(grounding=3.5))
    titles = " | ".join(title for title, _, _ in panels)
    for quantity in ("outcome reward", "Avg F1", "class accuracy", "localization gain", "loss", "KL", "entropy",
                     "completion length", "unparsable", "zero reward spread", "advantage terms", "grounding W"):
        assert quantity in titles
    assert all(y_label for _, y_label, _ in panels)
    reward = panels[0][2]
    assert set(reward) == {"train, per step", "train, 10-step mean", "held-out"}
    assert reward["held-out"] == ([0, 3], [0.2, 0.2])
    assert reward["train, 10-step mean"][1] == pytest.approx([0.1, 0.15, 0.2])  # trailing mean of 0.1, 0.2, 0.3
    terms = next(series for title, _, series in panels if title.startswith("advantage terms"))
    assert terms == {"A_main": ([1, 2, 3], [0.8] * 3), "A_TsR projected": ([1, 2, 3], [0.3] * 3)}
    training_curves(*logs(grounding=3.5), str(tmp_path / "curves.png"), "run")
    with Image.open(tmp_path / "curves.png") as img:
        assert img.size == (3 * 440, 24 + 5 * 250)  # 13 panels, 3 per row


def test_a_grpo_run_has_no_grounding_panel_and_missing_values_are_skipped(tmp_path):
    panels = curve_panels(*logs(grounding=None))  # GRPO computes no W; step 1 logged no KL
    assert not any("grounding" in title for title, _, _ in panels)
    terms = next(series for title, _, series in panels if title.startswith("advantage terms"))
    assert list(terms) == ["A_main"]  # no grounded term to draw
    training_curves(*logs(grounding=None), str(tmp_path / "curves.png"), "grpo")
    assert (tmp_path / "curves.png").stat().st_size > 0
