"""TimerPO: GRPO with an OT-grounded, orthogonally projected advantage (AnomSeer, arXiv 2602.08868).

`timerpo.detect(values, model=...)` finds anomalies on a whole series (timerpo/detection.py).
"""


def __getattr__(name):
    # Loaded on first use, so `import timerpo.<module>` stays as light as the module itself.
    if name == "detect":
        from timerpo.detection import detect
        return detect
    raise AttributeError(f"module 'timerpo' has no attribute {name!r}")
