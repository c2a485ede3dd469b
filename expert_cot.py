"""Expert chain of thought (ExpCoT) from classical time-series analyses (method.md §6).

Small analyses, each returning a dataclass of numbers and half-open [s, e) intervals:
  zscore_scan, histogram_outlier_score   global scan for extreme values
  trend_scan                              Savitzky–Golay (window 21, order 2) gradient after averaging out the cycle
  slope_change                            the slope test: a slope excess > 3σ that lasts (its half-peak run)
  period_scan                             sliding-window rFFT dominant period (window 100)
  matrix_profile, discord_scan            exact z-normalised matrix profile and its strongest discord
On top of them:
  StagedScan(series)                      the blind staged scan: global → structural → pattern
  trace_stages(scan, label)               the stages a trace runs: the blind order, continued to the stage
                                          whose numbers the true type's evidence needs
  expert_cot(series, intervals, label)    ground-truth-conditioned trace (Observation / Reasoning & Validation /
                                          Conclusion) quoting numbers it computed
The generic reasoning of the "w/o ExpCoT" ablation is timerpo/prompt.py's generic_cot. The classical blind
detector built on the staged scan, a baseline and not the method, is baselines.py.

Public thresholds (method.md §6): |z|max > 5 triggers the global scan, |z| > 3 flags; gradient deviations > 3σ
(here they must also last, SUSTAINED_CYCLES); period windows beyond 3σ, stable if the period std < 1; discord z > 3.5 with m = 50; noisy series (noise σ
above 5 % of the robust σ: the noisy-* families and the pure-noise range family) are Savitzky–Golay denoised (window 31,
order 2) before the gradient and pattern scans. Choices where those thresholds leave room are documented at each
function. numpy/scipy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import hilbert, medfilt, savgol_filter

from timerpo.prompt import check_truth

Z_TRIGGER = 5.0
Z_FLAG = 3.0
# Version of the trace text. Data folders record it (manifest.json "expcot_version"); train.py recomputes the
# traces of a folder written by another version (data_gen.with_current_expcot). Bump it when the text changes.
# 2: the slope test asks for a lasting change, and a trace runs every stage whose numbers it quotes.
EXPCOT_VERSION = "2"

SLOPE_Z = 3.0
# The slope test asks for a lasting change: the slope excess stays above half its peak for at least 3/4 of the
# averaging cycle and 20 steps. A slope change of d steps, averaged over a cycle of c, leaves an excess about
# max(d, c) wide at half its peak (the quarter of a cycle is room for noise); a brief bump of a point or
# frequency anomaly leaves only its own width (median 14-17 steps on the anomllm point and freq families).
SUSTAINED_CYCLES = 0.75
SUSTAINED_MIN_STEPS = 20
PERIOD_SIGMAS = 3.0
PERIOD_STABLE_STD = 1.0
DISCORD_Z = 3.5
DISCORD_RATIO = 2.0  # extra guard: a discord must also be ≥ 2× the median distance (see discord_scan)
MP_WINDOW = 50
FFT_WINDOW = 100
GRAD_WINDOW, GRAD_ORDER = 21, 2
DENOISE_WINDOW, DENOISE_ORDER = 31, 2
NOISY_RATIO = 0.05  # noise σ / robust σ of the series above which a series counts as noisy
PEAK_SHARE_MIN = 0.30  # spectral peak share below which a series has no clear period
HIST_BINS = 20
MAD_TO_SIGMA = 1.4826  # σ of a normal distribution = 1.4826 · MAD
SMOOTH_AC = 0.5  # increment autocorrelation from which a stretch reads as smooth (a sine) rather than irregular


# --------------------------------------------------------------------------------------------- helpers

def as_series(series) -> np.ndarray:
    """Finite 1-D float array or a clear ValueError."""
    x = np.asarray(series, dtype=float)
    if x.ndim != 1 or x.size < 8:
        raise ValueError(f"expected a 1-D series with at least 8 points, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"series has {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def runs(mask) -> list:
    """Half-open runs of True: [0,1,1,0,0,1,0] → [[1, 3], [5, 6]]."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])  # alternating starts and ends
    return [[int(s), int(e)] for s, e in zip(edges[::2], edges[1::2])]


def merge_close(intervals, gap: int) -> list:
    """Join intervals separated by at most ``gap`` steps: [[1,3],[5,6]] with gap 2 → [[1, 6]]."""
    out = []
    for s, e in intervals:
        if out and s - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def first_max(values, decimals: int = 4) -> int:
    """Index of the largest value after rounding to ``decimals`` (first of ties), so that float noise in
    a flat profile (e.g. 1e-13 differences) cannot move the reported position."""
    return int(np.argmax(np.round(np.asarray(values, dtype=float), decimals)))


def shift(intervals, offset: int) -> list:
    """Intervals moved right by ``offset``: [[1, 3]] by 15 → [[16, 18]]."""
    return [[s + offset, e + offset] for s, e in intervals]


def interval_mask(length: int, intervals) -> np.ndarray:
    """0/1 mask of half-open intervals: L = 6, [[1, 3], [5, 6]] → [F, T, T, F, F, T]."""
    mask = np.zeros(length, dtype=bool)
    for s, e in intervals:
        mask[s:e] = True
    return mask


def robust_sigma(values) -> float:
    """1.4826 · median absolute deviation (a normal σ, unaffected by a few outliers)."""
    v = np.asarray(values, dtype=float)
    return float(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def noise_sigma(x) -> float:
    """White-noise σ estimated from second differences: median|Δ²x| / (0.6745·√6).

    Δ²x of i.i.d. N(0, σ²) noise has std σ·√6 and a smooth signal barely contributes, so a clean
    sin(2π·0.03·t) gives ≈ 0.015 while the same sine + N(0, 0.08) gives ≈ 0.08.
    """
    d2 = np.diff(np.asarray(x, dtype=float), 2)  # [L-2]
    return float(np.median(np.abs(d2)) / (0.6745 * math.sqrt(6.0)))


def denoise(x) -> np.ndarray:
    """Savitzky–Golay smoothing, window 31, order 2 (method.md §6: denoising of noisy families)."""
    window = min(DENOISE_WINDOW, (len(x) - 1) // 2 * 2 + 1)
    return savgol_filter(np.asarray(x, dtype=float), window, DENOISE_ORDER)


def fmt(value: float, decimals: int) -> str:
    """Fixed-decimal text without '-0.000': fmt(-0.0001, 3) → '0.000'."""
    return f"{round(float(value), decimals) + 0.0:.{decimals}f}"


def times(factor: float) -> str:
    """A factor in words: times(2.0) → 'twice', times(3.0) → '3 times'."""
    return "twice" if factor == 2 else f"{factor:g} times"


def fmt_intervals(intervals) -> str:
    """Answer-format interval list: [[3, 7], [20, 25]]."""
    return "[" + ", ".join(f"[{int(s)}, {int(e)}]" for s, e in intervals) + "]"


# --------------------------------------------------------------------------------------------- global scan

@dataclass
class ZScan:
    """Robust z-score scan: z = (x − median) / (1.4826·MAD)."""
    center: float
    scale: float
    z: np.ndarray = field(repr=False)
    max_abs_z: float
    argmax: int
    triggered: bool
    intervals: list


def zscore_scan(series, trigger: float = Z_TRIGGER, flag: float = Z_FLAG, merge_gap: int = 3) -> ZScan:
    """Global k-sigma scan with the thresholds of method.md §6 (|z|max > 5 triggers, |z| > 3 flags).

    z uses the median and MAD instead of mean and std: a contaminated std shrinks the very z-scores the
    scan looks for. Flagged points form runs (gaps ≤ ``merge_gap`` joined); only runs holding a point above
    ``trigger`` are kept (hysteresis). Example: N(0, 0.1) noise with 20 points shifted by +0.65 gives
    max |z| ≈ 8 and one interval around the shifted points.
    """
    x = as_series(series)
    center = float(np.median(x))
    scale = max(robust_sigma(x), 1e-12)
    z = (x - center) / scale  # [L]
    absz = np.abs(z)
    argmax = int(np.argmax(absz))
    triggered = bool(absz[argmax] > trigger)
    intervals = []
    if triggered:
        for s, e in merge_close(runs(absz > flag), merge_gap):
            if absz[s:e].max() > trigger:
                intervals.append([s, e])
    return ZScan(center, scale, z, float(absz[argmax]), argmax, triggered, intervals)


@dataclass
class HistScan:
    """Histogram-based outlier score (HBOS-like): score(x_i) = log10(n / count of x_i's bin)."""
    scores: np.ndarray = field(repr=False)
    max_score: float
    isolated: int
    intervals: list


def histogram_outlier_score(series, bins: int = HIST_BINS, min_gap: int = 2, far: float = 0.5) -> HistScan:
    """Equal-width histogram over [min, max]; rare bins give high scores.

    ``isolated`` counts points cut off from the bulk (the bins reachable from the modal bin without
    crossing ``min_gap`` consecutive empty bins) and lying beyond it by at least ``far`` times the bulk's
    width: values no continuous stretch of the distribution reaches. Example: 999 points in [-1, 1] and one
    at 4.0 → that point is alone in the last bin, score log10(1000/1) = 3.00, isolated = 1.
    """
    x = as_series(series)
    counts, edges = np.histogram(x, bins=bins)  # [bins], [bins+1]
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)  # [L] bin of each point
    scores = np.log10(x.size / counts[idx])  # [L]
    mode = int(np.argmax(counts))
    reach = np.zeros(bins, dtype=bool)  # bins connected to the mode through < min_gap empty bins
    for direction in (1, -1):
        empty_run, k = 0, mode
        while 0 <= k < bins:
            if counts[k] > 0:
                if empty_run >= min_gap:
                    break
                reach[k], empty_run = True, 0
            else:
                empty_run += 1
            k += direction
    inside = np.flatnonzero(reach)
    lo, hi = edges[inside[0]], edges[inside[-1] + 1]
    isolated_points = ~reach[idx] & ((x < lo - far * (hi - lo)) | (x > hi + far * (hi - lo)))  # [L]
    return HistScan(scores, float(scores.max()), int(isolated_points.sum()), runs(isolated_points))


# --------------------------------------------------------------------------------------------- structural scan

@dataclass
class PeriodScan:
    """Global period estimate plus the sliding-window rFFT dominant-period scan."""
    peak_share: float
    periodic: bool
    global_period: float
    window_periods: np.ndarray = field(repr=False)
    median_period: float
    period_std: float
    stable: bool
    intervals: list


def spectrum_peak(series, min_period: float = 4.0):
    """(dominant period, peak share) of the linearly detrended series.

    Peak share = power of the dominant rFFT bin and its two neighbours / all non-DC power; the line is
    removed first so a trend's low-frequency power cannot pose as a cycle. Periods above L/4 are ignored.
    Example: sin(2π·0.03·t), L = 1000 → period 33.33, share ≈ 1.00.
    """
    x = as_series(series)
    t = np.arange(x.size)
    resid = x - np.polyval(np.polyfit(t, x, 1), t)  # [L]
    power = np.abs(np.fft.rfft(resid)) ** 2  # [L//2+1]
    k = np.arange(power.size)
    valid = (k >= 4) & (x.size / np.maximum(k, 1) >= min_period)
    total = power[1:].sum()
    if total <= 0 or not valid.any():
        return float("nan"), 0.0
    best = int(k[valid][np.argmax(power[valid])])
    share = power[max(1, best - 1):best + 2].sum() / total
    return x.size / best, float(share)


def period_scan(series, window: int = FFT_WINDOW, sigmas: float = PERIOD_SIGMAS,
                stable_std: float = PERIOD_STABLE_STD) -> PeriodScan:
    """Sliding-window rFFT: dominant period (DC removed) of every window of ``window`` steps (stride 1).

    The scan is stable when the std of the window periods is < 1; otherwise windows whose period lies more
    than 3 std from the median are flagged, and the union of their spans forms the intervals. Runs on the
    raw series: each window's FFT already averages white noise, whereas the 31-step denoiser would erase a
    3× faster cycle (gain 0.02 at period 11). Example: a clean sin(2π·0.03·t) gives period 33.33 in every
    window (std 0.00, stable).
    """
    x = as_series(series)
    period, share = spectrum_peak(x)
    window = min(window, x.size)
    views = sliding_window_view(x, window)  # [N_w, window]
    spec = np.abs(np.fft.rfft(views - views.mean(axis=1, keepdims=True), axis=1)) ** 2  # [N_w, window//2+1]
    best = 1 + np.argmax(spec[:, 1:], axis=1)  # [N_w] dominant non-DC bin
    periods = window / best  # [N_w]
    median, std = float(np.median(periods)), float(np.std(periods))
    stable = std < stable_std
    intervals = []
    if not stable:
        flagged = np.abs(periods - median) > sigmas * std  # [N_w]
        cover = np.zeros(x.size, dtype=bool)
        for s in np.flatnonzero(flagged):
            cover[s:s + window] = True
        intervals = runs(cover)
    return PeriodScan(share, share >= PEAK_SHARE_MIN, period, periods, median, std, stable, intervals)


@dataclass
class TrendScan:
    """Savitzky–Golay gradient scan; slopes are per 100 steps, positions are series indices."""
    cycle: int
    centers: np.ndarray = field(repr=False)
    slopes: np.ndarray = field(repr=False)
    baseline: float
    sigma: float
    max_z: float
    argmax: int
    intervals: list


SLOPE_SIGMA_FLOOR = 0.005  # per 100 steps; a clean piecewise-linear trend has MAD 0


def cycle_average(series, cycle: int):
    """Centred moving mean over one full cycle (valid part only) and the series index of each value.

    Averaging over exactly one period cancels the seasonal component and keeps the trend: for
    sin(2π·t/50) + 0.001·t and cycle 50 every value equals the line at its centre (± 1e-12).
    """
    x = np.asarray(series, dtype=float)
    cycle = max(1, min(int(cycle), x.size // 4))
    avg = np.convolve(x, np.full(cycle, 1.0 / cycle), mode="valid")  # [L-cycle+1]
    centers = np.arange(avg.size) + (cycle - 1) // 2  # [L-cycle+1]
    return avg, centers


def averaging_cycle(period: float, length: int) -> int:
    """Whole number of steps spanning a whole number of cycles, for cycle_average.

    A moving mean cancels a sine only when its length is a multiple of the period: period 33.33 → 100
    (3 cycles), 50 → 50, 25 → 25. Takes the first k·period (k ≥ 1, ≤ L/4) within 0.05 of an integer,
    else round(period); no period (NaN) → 1 (no averaging).
    """
    if not np.isfinite(period) or period < 2:
        return 1
    k = 1
    while k * period <= length / 4:
        if abs(k * period - round(k * period)) <= 0.05:
            return int(round(k * period))
        k += 1
    return int(min(round(period), length // 4))


def trend_scan(series, cycle: int = 1, window: int = GRAD_WINDOW, order: int = GRAD_ORDER,
               sigmas: float = SLOPE_Z) -> TrendScan:
    """Gradient deviations > 3σ of the Savitzky–Golay (window 21, order 2) derivative.

    With ``cycle`` > 1 the series is first averaged over one cycle (see cycle_average); otherwise the sine
    of the trend families (slope up to 0.13 per step) would hide a trend change of 0.01 per step.
    Baseline = median slope, σ = max(1.4826·MAD, 0.005 per 100 steps). Example: the trend family's normal
    rise 3.0 over L = 1000, min-max scaled by ≈ 0.4, gives a baseline ≈ 0.12 per 100 steps.
    """
    x = as_series(series)
    avg, centers = cycle_average(x, cycle)
    win = min(window, (avg.size - 1) // 2 * 2 + 1)
    slopes = 100.0 * savgol_filter(avg, win, min(order, win - 1), deriv=1)  # [L-cycle+1] per 100 steps
    baseline = float(np.median(slopes))
    sigma = max(robust_sigma(slopes), SLOPE_SIGMA_FLOOR)
    dev = np.abs(slopes - baseline) / sigma
    k = first_max(dev)
    intervals = [[int(centers[s]), int(centers[e - 1]) + 1] for s, e in runs(dev > sigmas)]
    return TrendScan(int(max(1, min(int(cycle), x.size // 4))), centers, slopes, baseline, sigma,
                     float(dev[k]), int(centers[k]), intervals)


@dataclass
class SlopeChange:
    """The slope test on a trend scan: the run of centres around the largest slope excess where the excess keeps
    at least half its peak, and whether the change is there (peak above 3σ and the run long enough)."""
    run: int
    needed: int
    fired: bool
    intervals: list


def slope_change(trend: TrendScan, length: int, cycles: float = SUSTAINED_CYCLES,
                 min_steps: int = SUSTAINED_MIN_STEPS) -> SlopeChange:
    """Slope test: |excess| peak > 3σ (trend.max_z at trend.argmax) lasting ≥ max(ceil(cycles · cycle), min_steps)
    centres at half the peak or more, same sign. Its interval spans that run, to the series end when the run
    reaches the last centre (still changing there).

    Example: a clean sin(2π·0.02·t) rising 3.0 over 1000 steps and 10.0 on [800, 900) has its peak at ≈ 850 and
    a run ≈ 100 steps (cycle 50: 38 needed), so it fires with an interval ≈ [800, 900).
    """
    dev = (trend.slopes - trend.baseline) / trend.sigma  # [N] signed excess in σ
    k = int(np.searchsorted(trend.centers, trend.argmax))
    needed = max(math.ceil(cycles * trend.cycle), min_steps)
    high = np.sign(dev[k]) * dev >= abs(dev[k]) / 2  # [N]
    lo, hi = k, k
    while lo > 0 and high[lo - 1]:
        lo -= 1
    while hi + 1 < high.size and high[hi + 1]:
        hi += 1
    run = hi - lo + 1
    fired = bool(trend.max_z > SLOPE_Z and run >= needed)
    end = length if hi == high.size - 1 else int(trend.centers[hi]) + 1
    return SlopeChange(run, needed, fired, [[int(trend.centers[lo]), end]] if fired else [])


# --------------------------------------------------------------------------------------------- pattern scan

def exclusion_radius(m: int) -> int:
    """Trivial-match zone: neighbours j with |i − j| ≤ ceil(m/4) are not matches of window i."""
    return int(math.ceil(m / 4))


def matrix_profile(series, m: int = MP_WINDOW, block: int = 512):
    """Exact z-normalised matrix profile: (distances [N], nearest-neighbour index [N]), N = L − m + 1.

    d(i, j) = sqrt(2m·(1 − corr(x[i:i+m], x[j:j+m]))), minimised over j outside the trivial-match zone.
    Vectorised: windows are z-normalised once, correlations come from blocked matrix products (BLAS), so
    there is no Python loop over pairs or window offsets. Flat windows (σ = 0): two flat windows are at
    distance 0, a flat and a non-flat window at sqrt(m). Example: a pure sine of period 25 with m = 50 has
    a profile ≈ 0 everywhere (every window recurs one period later).
    """
    x = as_series(series)
    if not 4 <= m <= x.size // 2:
        raise ValueError(f"matrix profile window m={m} must be in [4, L/2] for L={x.size}")
    views = sliding_window_view(x, m)  # [N, m]
    mu = views.mean(axis=1, keepdims=True)  # [N, 1]
    sd = views.std(axis=1, keepdims=True)  # [N, 1]
    flat = sd[:, 0] <= 1e-12 * max(1.0, float(np.abs(x).max()))  # [N]
    zn = np.where(flat[:, None], 0.0, (views - mu) / np.where(sd > 0, sd, 1.0))  # [N, m]
    n = views.shape[0]
    excl = exclusion_radius(m)
    offsets = np.arange(-excl, excl + 1)  # [2·excl+1] trivial-match diagonals
    any_flat = bool(flat.any())
    best = np.empty(n)
    index = np.empty(n, dtype=np.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        corr = zn[lo:hi] @ zn.T / m  # [b, N]
        if any_flat:
            both = flat[lo:hi, None] & flat[None, :]  # [b, N]
            one = flat[lo:hi, None] ^ flat[None, :]  # [b, N]
            corr[both], corr[one] = 1.0, 0.5
        rows = np.repeat(np.arange(hi - lo), offsets.size)  # [b·(2·excl+1)]
        cols = (np.arange(lo, hi)[:, None] + offsets[None, :]).ravel()  # [b·(2·excl+1)]
        keep = (cols >= 0) & (cols < n)
        corr[rows[keep], cols[keep]] = -np.inf
        index[lo:hi] = np.argmax(corr, axis=1)
        best[lo:hi] = corr[np.arange(hi - lo), index[lo:hi]]
    dist = np.sqrt(np.clip(2.0 * m * (1.0 - np.minimum(best, 1.0)), 0.0, None))  # [N]
    return dist, index


@dataclass
class DiscordScan:
    """Strongest discord of the matrix profile."""
    m: int
    profile: np.ndarray = field(repr=False)
    median: float
    sigma: float
    max_distance: float
    argmax: int
    z: float
    found: bool
    intervals: list


def discord_scan(series, m: int = MP_WINDOW, threshold: float = DISCORD_Z,
                 ratio: float = DISCORD_RATIO) -> DiscordScan:
    """Discord z = (max profile − median) / σ, σ = max(1.4826·MAD of the profile, 0.05·sqrt(m)).

    The σ floor keeps a nearly perfect periodic series (profile ≈ 1e-7 everywhere) from producing absurd z
    values; the extra ratio guard (max ≥ 2 × median) stops smooth random noise, whose windows all sit far
    from each other, from posing as a discord. Intervals: points every window through which has a
    profile above median + threshold·σ (a point is anomalous when no window containing it finds a match).
    """
    x = as_series(series)
    m = min(m, x.size // 4)
    profile, _ = matrix_profile(x, m)
    median = float(np.median(profile))
    sigma = max(robust_sigma(profile), 0.05 * math.sqrt(m))
    k = first_max(profile)
    z = (float(profile[k]) - median) / sigma
    found = bool(z > threshold and profile[k] >= ratio * median)
    intervals = []
    if found:
        high = profile > median + threshold * sigma  # [N]
        # point t is covered by windows i in [t-m+1, t]; anomalous if all of them are high
        cover = np.convolve(high.astype(float), np.ones(m), mode="full")  # [L]: number of high windows through t
        through = np.convolve(np.ones(profile.size), np.ones(m), mode="full")  # [L]: windows through t
        intervals = runs(cover >= through - 0.5)
    return DiscordScan(m, profile, median, sigma, float(profile[k]), k, z, found, intervals)


# --------------------------------------------------------------------------------------------- staged scan

class StagedScan:
    """Blind staged scan of one series (method.md §6): global → structural → pattern.

    Every analysis is computed lazily and cached, so a trace only pays for the scans it quotes. ``y`` is
    the series used by the gradient and pattern scans: the Savitzky–Golay denoised copy when noisy.
    """

    MIN_LENGTH = 64  # room for the 31-step denoiser, a 50-step matrix profile window and a few cycles

    def __init__(self, series):
        self.x = as_series(series)
        self.length = int(self.x.size)
        if self.length < self.MIN_LENGTH:
            raise ValueError(f"the staged scan needs a series of at least {self.MIN_LENGTH} points, "
                             f"got {self.length}")
        self.noise = noise_sigma(self.x)
        # Relative to the spread: the anomllm noisy families have N(0, 0.08) on a ±1 cycle (ratio ≈ 0.08;
        # range, pure N(0, 0.1) noise, ≈ 1),
        # clean ones ≈ 0.015, TODS-style series N(0, 0.05) on a ±1.5 cycle ≈ 0.04 (left raw: the 31-step
        # filter would halve their period-25 cycle).
        self.noise_ratio = self.noise / max(robust_sigma(self.x), 1e-12)
        self.noisy = self.noise_ratio > NOISY_RATIO
        # The smoothed copy drops the DENOISE_WINDOW//2 points at each end, where the filter can only
        # extrapolate (a quadratic through half a sine period) and would fake discords and slope changes.
        self.offset = DENOISE_WINDOW // 2 if self.noisy and self.length >= 2 * self.MIN_LENGTH else 0
        self.y = denoise(self.x)[self.offset:self.length - self.offset] if self.noisy else self.x
        self._cache = {}

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def z(self) -> ZScan:
        return self._get("z", lambda: zscore_scan(self.x))

    @property
    def hist(self) -> HistScan:
        return self._get("hist", lambda: histogram_outlier_score(self.x))

    @property
    def period(self) -> PeriodScan:
        return self._get("period", lambda: period_scan(self.x))

    @property
    def cycle(self) -> int:
        return averaging_cycle(self.period.global_period, self.length) if self.period.periodic else 1

    @property
    def trend(self) -> TrendScan:
        """Trend scan of ``y``, positions shifted back to series indices."""
        def run():
            t = trend_scan(self.y, self.cycle)
            return replace(t, centers=t.centers + self.offset, argmax=t.argmax + self.offset,
                           intervals=shift(t.intervals, self.offset))
        return self._get("trend", run)

    @property
    def discord(self) -> DiscordScan:
        """Discord scan of ``y``; profile index i is the series window [i + offset, i + offset + m)."""
        def run():
            d = discord_scan(self.y)
            return replace(d, argmax=d.argmax + self.offset, intervals=shift(d.intervals, self.offset))
        return self._get("discord", run)

    @property
    def global_hit(self) -> bool:
        return self.z.triggered or self.hist.isolated > 0

    @property
    def period_hit(self) -> bool:
        return self.period.periodic and not self.period.stable

    @property
    def slope(self) -> SlopeChange:
        return self._get("slope", lambda: slope_change(self.trend, self.length))

    @property
    def slope_hit(self) -> bool:
        return self.slope.fired

    @property
    def structural_hit(self) -> bool:
        return self.period_hit or self.slope_hit


# The last stage whose numbers the evidence for each true type quotes (method.md §6, Reasoning & Validation):
# extreme values (global), slope and period statistics (structural), the discord score (pattern). A normal
# trace shows that no scan finds anything, so it runs them all.
GLOBAL, STRUCTURAL, PATTERN = 0, 1, 2
EVIDENCE_STAGE = {"global point": GLOBAL, "trend": STRUCTURAL, "seasonal": STRUCTURAL,
                  "contextual point": PATTERN, "shapelet": PATTERN, "normal": PATTERN}


@dataclass
class TraceStages:
    """Which scans a trace runs, and whether it runs one only because the true type's evidence needs it."""
    structural: bool
    pattern: bool
    structural_for_evidence: bool
    pattern_for_evidence: bool


def trace_stages(scan: StagedScan, label: str) -> TraceStages:
    """The staged scan of method.md §6 as a trace runs it: the structural scan when the global scan finds no
    extreme values, the pattern scan when the structure is stable; and a stage the blind order would skip
    when the evidence of the true type needs its numbers (EVIDENCE_STAGE), said so in the text. So no trace
    skips a stage and then quotes it."""
    need = EVIDENCE_STAGE[label]
    structural = not scan.global_hit or need >= STRUCTURAL
    pattern = structural and (not scan.structural_hit or need >= PATTERN)
    return TraceStages(structural, pattern, structural and scan.global_hit, pattern and scan.structural_hit)


def runs_pattern_scan(scan: StagedScan, label: str) -> bool:
    """Whether the trace for `label` runs the pattern scan (trace_stages)."""
    return trace_stages(scan, label).pattern


# ----------------------------------------------------------------------------------- evidence inside intervals

def steps_inside(length: int, intervals):
    """Masks over the L−1 steps t → t+1: (both ends inside one interval, both ends outside all)."""
    inside = np.zeros(length - 1, dtype=bool)
    for s, e in intervals:
        inside[s:e - 1] = True
    covered = interval_mask(length, intervals)
    outside = ~covered[:-1] & ~covered[1:]
    return inside, outside


def activity_ratio(series, intervals) -> float:
    """Mean |Δx| over steps inside the intervals / mean |Δx| over steps outside them (NaN if either is empty).

    For a sine A·sin(2πft) the mean |Δx| is ≈ 4·A·f, so the ratio is ≈ 3 where the frequency triples and
    ≈ 1/3 where it drops to a third.
    """
    x = np.asarray(series, dtype=float)
    inside, outside = steps_inside(x.size, intervals)
    if not inside.any() or not outside.any():
        return float("nan")
    d = np.abs(np.diff(x))  # [L-1]
    return float(d[inside].mean() / max(d[outside].mean(), 1e-12))


def local_frequency(y, light: bool) -> np.ndarray:
    """Cycles per step at every step t → t+1, from the phase of the analytic signal. [L] -> [L-1]

    A fitted line is removed first so level and overall trend do not bend the phase; ``light`` adds a
    9-step Savitzky–Golay smoothing against noise; a 5-step median filter removes phase-slip spikes.
    Example: sin(2π·0.03·t) gives ≈ 0.03 everywhere (a period of 33.3 steps).
    """
    y = np.asarray(y, dtype=float)
    t = np.arange(y.size)
    hp = y - np.polyval(np.polyfit(t, y, 1), t)  # [L] cycle without level or overall trend
    if light:
        hp = savgol_filter(hp, 9, 2)
    phase = np.unwrap(np.angle(hilbert(hp)))  # [L]
    return medfilt(np.diff(phase) / (2 * np.pi), 5)  # [L-1]


def local_periods(series, intervals, light: bool) -> tuple[float, float]:
    """(dominant period outside, dominant period inside) in steps: 1 / the median local frequency
    (`local_frequency`) over the steps outside all intervals, and over the steps inside them (NaN if empty).

    The 100-step sliding rFFT cannot resolve the usual seasonal episode (7-40 steps): the unchanged
    cycle fills most of every window, so its period std often stays below 1. The analytic signal's phase
    is local, so its period inside an episode is the episode's own. Example: sin(2π·Σf) with f = 0.03
    and f = 0.09 on [400, 430) gives ≈ (33.3, 11.1).
    """
    freq = local_frequency(series, light)  # [L-1]
    inside, outside = steps_inside(freq.size + 1, intervals)
    if not inside.any() or not outside.any():
        return float("nan"), float("nan")
    return 1.0 / float(np.median(freq[outside])), 1.0 / float(np.median(freq[inside]))


def increment_autocorrelation(series, intervals) -> float:
    """Lag-1 correlation of the increments Δx inside the intervals, pairs pooled over intervals.

    Smooth curves give values near 1 (a sine of frequency f: cos 2πf), white noise gives −0.5.
    NaN when fewer than 3 pairs exist or a side has no variance.
    """
    x = np.asarray(series, dtype=float)
    a, b = [], []
    for s, e in intervals:
        d = np.diff(x[s:e])
        a.append(d[:-1])
        b.append(d[1:])
    a = np.concatenate(a) if a else np.zeros(0)
    b = np.concatenate(b) if b else np.zeros(0)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def windows_touching(n_windows: int, m: int, intervals) -> np.ndarray:
    """Mask of matrix-profile windows [i, i+m) that overlap any interval; if none does (an interval in
    the trimmed edge of a denoised series) the window nearest to the first interval stands in."""
    mask = np.zeros(n_windows, dtype=bool)
    for s, e in intervals:
        mask[min(n_windows, max(0, s - m + 1)):min(n_windows, max(0, e))] = True
    if not mask.any():
        s, e = intervals[0]
        mask[int(np.clip(s - m + 1 if s > 0 else 0, 0, n_windows - 1))] = True
    return mask


def slope_inside(trend: TrendScan, intervals) -> float:
    """Mean cycle-averaged slope at centres inside the intervals; when no centre falls inside (an interval
    at the very edge) the slope at the centre nearest to the first interval's midpoint is used."""
    inside = np.zeros(trend.centers.size, dtype=bool)
    for s, e in intervals:
        inside |= (trend.centers >= s) & (trend.centers < e)
    if inside.any():
        return float(trend.slopes[inside].mean())
    s, e = intervals[0]
    k = int(np.argmin(np.abs(trend.centers - (s + e - 1) / 2)))
    return float(trend.slopes[k])


# --------------------------------------------------------------------------------------------- trace text

def observation_text(scan: StagedScan, label: str) -> str:
    """Observation: the staged scan as the trace runs it (trace_stages), quoting its numbers."""
    stages = trace_stages(scan, label)
    z, h = scan.z, scan.hist
    parts = [f"Staged scan of L = {scan.length} points. Global scan: median = {fmt(z.center, 3)}, "
             f"robust σ = {fmt(z.scale, 3)}, max |z| = {fmt(z.max_abs_z, 2)} at t = {z.argmax}, "
             f"{'above' if z.triggered else 'below'} the trigger {Z_TRIGGER:g}; "
             f"histogram score = {fmt(h.max_score, 2)}, isolated points = {h.isolated}."]
    if not stages.structural:
        parts.append("Extreme values are present, so the structural and pattern scans are not needed.")
        return " ".join(parts)
    if stages.structural_for_evidence:
        parts.append("Extreme values are present, but the type is still open, so the structural scan follows.")
    parts.append(f"Structural scan: noise ratio = {fmt(scan.noise_ratio, 3)}, " + (
        f"above {NOISY_RATIO:g}, so the later scans use a smoothed copy (window {DENOISE_WINDOW}, order "
        f"{DENOISE_ORDER})." if scan.noisy else f"below {NOISY_RATIO:g}, so raw values are used."))
    p = scan.period
    if p.periodic:
        parts.append(f"The spectrum peaks at global period = {fmt(p.global_period, 2)} (peak share = "
                     f"{fmt(p.peak_share, 2)}); the sliding rFFT (window {FFT_WINDOW}) gives dominant period = "
                     f"{fmt(p.median_period, 2)} with period std = {fmt(p.period_std, 2)}, "
                     + (f"stable (below {PERIOD_STABLE_STD:g})." if p.stable
                        else f"unstable ({PERIOD_STABLE_STD:g} or more)."))
    else:
        parts.append(f"There is no clear cycle (peak share = {fmt(p.peak_share, 2)}, below {fmt(PEAK_SHARE_MIN, 2)}), "
                     "so the period scan is skipped.")
    parts.append(slope_sentence(scan))
    if not stages.pattern:
        parts.append("The structure changes, so the pattern scan is not needed.")
        return " ".join(parts)
    parts.append("The structure changes, but the local shape is still open, so the pattern scan follows."
                 if stages.pattern_for_evidence else "The structure is stable.")
    parts.append(discord_sentence(scan))
    return " ".join(parts)


def slope_sentence(scan: StagedScan) -> str:
    """Slope-test sentence: the gradient statistics, and for an excess above 3σ how long it lasts."""
    t, change = scan.trend, scan.slope
    averaged = f" of the cycle average (cycle = {t.cycle} steps)" if t.cycle > 1 else ""
    text = (f"The Savitzky–Golay gradient (window {GRAD_WINDOW}, order {GRAD_ORDER}){averaged} has baseline slope = "
            f"{fmt(t.baseline, 3)} per 100 steps and max slope z = {fmt(t.max_z, 2)} at t = {t.argmax}")
    if t.max_z <= SLOPE_Z:
        return text + f", below {SLOPE_Z:g}: the slope is steady."
    if not change.fired:
        return (text + f", above {SLOPE_Z:g}, but half of it lasts only sustained run = {change.run} steps: "
                "a brief bump.")
    return (text + f", above {SLOPE_Z:g}; half of it lasts sustained run = {change.run} steps (needed run = "
            f"{change.needed} steps): the slope changes.")


def discord_sentence(scan: StagedScan) -> str:
    """Pattern-scan sentence with the strongest discord."""
    d = scan.discord
    verdict = f"above {DISCORD_Z:g}." if d.found else (
        f"above {DISCORD_Z:g} but under {times(DISCORD_RATIO)} the median distance." if d.z > DISCORD_Z
        else f"below {DISCORD_Z:g}.")
    return (f"Pattern scan: the matrix profile (m = {d.m}) has median distance = {fmt(d.median, 3)}, "
            f"max distance = {fmt(d.max_distance, 3)} at t = {d.argmax}, discord z = {fmt(d.z, 2)}, {verdict}")


def where(intervals) -> str:
    """Interval list in the text, or a reference to the conclusion when it is long (token budget)."""
    return fmt_intervals(intervals) if len(intervals) <= 3 else "the intervals of the conclusion"


def range_clause(scan: StagedScan, intervals) -> str:
    """'inside max |z| = v' clause: the largest robust |z| inside the intervals."""
    zin = float(np.abs(scan.z.z[interval_mask(scan.length, intervals)]).max())
    return f"inside max |z| = {fmt(zin, 2)}"


def shape_clause(scan: StagedScan, intervals) -> str:
    """Matrix-profile evidence for the windows that touch the intervals."""
    d = scan.discord
    touch = windows_touching(d.profile.size, d.m, shift(intervals, -scan.offset))
    return f"windows touching {where(intervals)} reach max distance inside = {fmt(d.profile[touch].max(), 3)}"


def validation_text(scan: StagedScan, intervals, label: str) -> str:
    """Reasoning & Validation: the evidence that fits the true type, checked with numbers."""
    iv = where(intervals)
    head = "Reasoning & Validation: "
    if label == "global point":
        absz = np.abs(scan.z.z)
        mask = interval_mask(scan.length, intervals)
        text = (f"{head}extreme values decide the type. Inside {iv} the values reach inside max |z| = "
                f"{fmt(absz[mask].max(), 2)} with mean |z| inside = {fmt(absz[mask].mean(), 2)}")
        if (~mask).any():
            text += f", while outside max |z| = {fmt(absz[~mask].max(), 2)}"
        return text + (". Points this far from the median leave the range of the whole series: they are "
                       "global point anomalies.")
    if label == "trend":
        t = scan.trend
        inside = slope_inside(t, intervals)
        excess = (inside - t.baseline) / t.sigma
        size = (f"above {SLOPE_Z:g}" if abs(excess) > SLOPE_Z
                else f"below {SLOPE_Z:g}, small against the slope noise but sustained")
        return (f"{head}the values stay in range ({range_clause(scan, intervals)}), so the slope decides. "
                f"Inside {iv} the cycle-averaged gradient has mean slope inside = {fmt(inside, 3)} per 100 "
                f"steps against baseline slope = {fmt(t.baseline, 3)}, slope excess z = {fmt(excess, 2)}, "
                f"{size}. A lasting change in the rate of rise is a trend anomaly.")
    if label == "normal":
        return normal_validation(scan)
    ac = increment_autocorrelation(scan.x, intervals)
    if label == "contextual point":
        text = (f"{head}the values stay within the normal range ({range_clause(scan, intervals)}, "
                f"below {Z_TRIGGER:g}), so this is no global outlier. The matrix profile confirms a local break: "
                f"{shape_clause(scan, intervals)}.")
        if np.isfinite(ac):
            text += (f" The increments there are {'irregular' if ac < SMOOTH_AC else 'unusual'} (increment "
                     f"autocorrelation = {fmt(ac, 2)}), unlike the smooth pattern around them.")
        return text + " Values normal for the series but wrong for their place are contextual point anomalies."
    ratio = activity_ratio(scan.x, intervals)
    if label == "seasonal":
        return seasonal_validation(scan, intervals, head, iv, ac)
    if label == "shapelet":
        text = (f"{head}the values stay in range ({range_clause(scan, intervals)}) but the shape breaks: "
                f"{shape_clause(scan, intervals)}.")
        if np.isfinite(ratio):
            text += f" The mean step size changes by activity ratio = {fmt(ratio, 2)}"
            text += (f" and the increments give increment autocorrelation = {fmt(ac, 2)}" if np.isfinite(ac) else "")
            text += "."
        return text + (" A stretch that keeps the range and length of the cycle but not its waveform is a "
                       "shapelet anomaly.")
    return normal_validation(scan)


def seasonal_validation(scan: StagedScan, intervals, head: str, iv: str, ac: float) -> str:
    """Seasonal evidence: dominant-period statistics inside against outside the intervals."""
    text = f"{head}the values stay in range ({range_clause(scan, intervals)}) but the rhythm changes."
    outside, inside = local_periods(scan.x, intervals, light=scan.noisy)
    if not (np.isfinite(outside) and np.isfinite(inside)):  # the episode leaves no side to compare
        if runs_pattern_scan(scan, "seasonal"):
            text += f" The matrix profile marks the change: {shape_clause(scan, intervals)}."
        return text + " A change in the frequency of the cycle is a seasonal anomaly."
    p = scan.period
    if p.periodic and p.stable:
        text += " The episode is too short for the sliding rFFT, so the local period decides."
    text += (f" The local period of the analytic signal is period outside = {fmt(outside, 2)} steps and period "
             f"inside = {fmt(inside, 2)} steps in {iv} (period ratio = {fmt(inside / outside, 2)}), so the cycle runs "
             f"{'faster' if inside < outside else 'slower'} there")
    text += (f", with smooth increments as in a sine (increment autocorrelation = {fmt(ac, 2)})."
             if np.isfinite(ac) and ac >= SMOOTH_AC else ".")
    return text + " A change in the frequency of the cycle is a seasonal anomaly."


def normal_validation(scan: StagedScan) -> str:
    """Reasoning & Validation for an anomaly-free series: why each scan's strongest signal is not enough."""
    d = scan.discord
    notes = []
    notes.append("a few extreme values exist but form no lasting change" if scan.global_hit
                 else "the values stay within their usual range")
    if scan.period.periodic:
        notes.append("the period varies without a clear episode" if scan.period_hit else "the period stays stable")
    notes.append("the slope change is not backed by another scan" if scan.slope_hit
                 else "the slope deviation is brief" if scan.trend.max_z > SLOPE_Z
                 else "the slope stays near its baseline")
    if d.z > DISCORD_Z:  # only the ratio guard failed
        weak = (f"discord z = {fmt(d.z, 2)} but max distance = {fmt(d.max_distance, 3)} at t = {d.argmax} "
                f"is under {times(DISCORD_RATIO)} the median distance = {fmt(d.median, 3)}")
    else:
        weak = f"discord z = {fmt(d.z, 2)}, below {DISCORD_Z:g}"
    return ("Reasoning & Validation: no scan gives consistent evidence of an anomaly: " + ", ".join(notes)
            + f", and the strongest discord is weak ({weak}).")


def conclusion_text(intervals, label: str) -> str:
    """Conclusion in the answer notation."""
    if label == "normal":
        return "Conclusion: no anomaly; type normal, intervals []."
    return f"Conclusion: type {label}, intervals {fmt_intervals(intervals)}."


def expert_cot(series, intervals, label: str, scan: StagedScan | None = None) -> str:
    """Ground-truth-conditioned ExpCoT: Observation (blind staged scan), Reasoning & Validation (evidence
    for the true type on the true intervals) and Conclusion (type and intervals in answer notation).

    Every number is computed here from the series and printed with fixed decimals.
    """
    scan = StagedScan(series) if scan is None else scan
    intervals = check_truth(intervals, label, scan.length)
    return "\n".join(["Observation: " + observation_text(scan, label), validation_text(scan, intervals, label),
                      conclusion_text(intervals, label)])
