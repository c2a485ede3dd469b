"""Real univariate series in, plots out, intervals back onto the series' own index.

Reading (``read_series``), one file or every .csv / .out file of a folder:
  * TimeEval / GutenTAG CSV: a header ``timestamp,value,is_anomaly``; several value columns are allowed when
    ``--column`` names the one to read;
  * TSB-UAD ``.out``: two columns ``value,label`` and no header;
  * NAB: ``timestamp,value`` CSV files, the label windows in a JSON file (``--labels``) mapping each file name
    to ``[[start_timestamp, end_timestamp], ...]`` (both ends inclusive, as NAB writes them);
  * a plain one-column CSV (with or without a header line): no labels, detection only.
Point labels and label windows become half-open [s, e) index intervals, like everywhere in the project.

Choices where a real file can be bad (each refusal is a one-line SeriesError naming the file, before
anything is written):
  * missing values (empty cells, ``nan``, ``NA``, ``null``) are filled by linear interpolation between their
    neighbours (the nearest value at either end) and reported as a warning; a column with fewer than two
    numbers is refused;
  * non-numeric or infinite cells, a constant series, overlapping label windows and label windows outside
    the series are refused;
  * a series shorter than one window is refused (the message says which --window would fit): every window
    then has exactly the length the prompt states.

Windowing (``window_starts``): windows of L points at offsets 0, S, 2S, ... plus one more ending at the last
point when the stride does not land there, so every index lies in at least one window. Each window is
min-max scaled to [-1, 1] and drawn by data_gen's renderer on the anomllm axis (-1.25, 1.25): the plot looks
like the training plots whatever the units (``normalise_window``).

Merging (``merge_windows``): a window's predicted intervals are shifted by its offset and the union over all
windows is taken (overlapping or touching intervals join): an index is anomalous when any window that
contains it says so.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

import data_gen
from expert_cot import runs
from timerpo.files import png_bytes, write_atomic
from timerpo.metrics import to_events
from timerpo.progress import progress_bar

DEFAULT_WINDOW = data_gen.SUITE_LENGTH["anomllm"]  # the training length: one pixel column per step
MIN_WINDOW = 64  # expert_cot.StagedScan.MIN_LENGTH: the classical detector needs this many points
SUFFIXES = (".csv", ".out")
TIME_COLUMNS = ("timestamp", "time", "date", "datetime")
LABEL_COLUMNS = ("is_anomaly", "label", "anomaly")
MISSING = ("", "nan", "na", "null")  # cells read as a gap, compared lower-case
SERIES_YLIM = data_gen.SUITE_YLIM["anomllm"]  # windows are scaled to [-1, 1], as the anomllm series are
NORMALISATION = ("per window: min-max to [-1, 1], i.e. 2 (x - min) / (max - min) - 1 over the window's own "
                 "points (a flat window becomes all 0); drawn with y-limits (-1.25, 1.25)")


class SeriesError(ValueError):
    """A real series that cannot be used; the message is one line and names the file."""


@dataclass
class RealSeries:
    """One univariate series read from a file, with its labels when the file (or --labels) has any."""

    path: str
    name: str  # file name without suffix: the family of its windows and the stem of their ids
    fmt: str  # "timeeval", "tsb-uad", "nab" or "unlabelled"
    column: str | None  # the value column's header name (None: a file without header)
    values: np.ndarray = field(repr=False)  # [N] float64, gaps filled
    timestamps: list | None = field(repr=False)  # [N] the timestamp cells as written, or None
    intervals: list | None  # half-open [s, e) anomalies on 0..N, None when unlabelled
    notes: list = field(default_factory=list)  # warnings for the user (e.g. filled gaps)

    @property
    def length(self) -> int:
        """Number of points N."""
        return int(self.values.size)


# --------------------------------------------------------------------------------------------- files


def series_files(path: str) -> list[str]:
    """The file itself, or the .csv / .out files directly inside a folder, sorted by name."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(SUFFIXES) and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise SeriesError(f"{path}: no .csv or .out files in this folder")
        return files
    if not os.path.isfile(path):
        raise SeriesError(f"{path}: no such file or folder")
    if not path.lower().endswith(SUFFIXES):
        raise SeriesError(f"{path}: unsupported file type; expected .csv (TimeEval/GutenTAG, NAB or one "
                          f"column) or .out (TSB-UAD value,label)")
    return [path]


def series_name(path: str) -> str:
    """File name without suffix, made safe for sample ids: 'data/NAB/nyc taxi.csv' -> 'nyc-taxi'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "series"


def read_rows(path: str) -> list[tuple[int, list[str]]]:
    """(line number, stripped cells) of every CSV row; empty lines at the start and end are dropped (an empty
    line inside a one-column file is a missing value, see layout)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(fh), start=1)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SeriesError(f"{path}: cannot be read as CSV text ({err})") from None
    while rows and not rows[-1][1]:
        rows.pop()
    while rows and not rows[0][1]:
        rows.pop(0)
    if not rows:
        raise SeriesError(f"{path}: the file holds no rows")
    return rows


def parse_number(cell: str, where: str) -> float:
    """A cell as a float; NaN for a missing cell; SeriesError for text or an infinite value."""
    if cell.lower() in MISSING:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise SeriesError(f"{where}: {cell!r} is not a number") from None
    if math.isinf(value):
        raise SeriesError(f"{where}: {cell!r} is not a finite number")
    return value


def is_number(cell: str) -> bool:
    """Whether float() reads the cell ('nan' and 'inf' included; parse_number judges those)."""
    try:
        float(cell)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------- columns


def first_number_at(body, k: int) -> bool:
    """Whether the first non-missing cell of column k is a number (a text column is not a value column)."""
    cell = next((cells[k] for _, cells in body if cells[k].lower() not in MISSING), "")
    return is_number(cell)


def pick_value_column(path: str, header: list[str], body, column: str | None) -> int:
    """Index of the value column: ``column`` when given, else the only numeric column besides the
    timestamp and label columns (a text column such as a comment is skipped)."""
    names = [h.lower() for h in header]
    candidates = [k for k, h in enumerate(names) if h not in TIME_COLUMNS and h not in LABEL_COLUMNS]
    if column is not None:
        if column not in header:
            raise SeriesError(f"{path}: no column named {column!r}; value columns: "
                              f"{', '.join(header[k] for k in candidates) or 'none'}")
        k = header.index(column)
        if k not in candidates:
            raise SeriesError(f"{path}: --column {column!r} is the timestamp or label column, not a value column")
        return k
    numeric = [k for k in candidates if first_number_at(body, k)]
    if not numeric:
        raise SeriesError(f"{path}: no numeric value column (columns: {', '.join(header)})")
    if len(numeric) > 1:
        raise SeriesError(f"{path}: several value columns ({', '.join(header[k] for k in numeric)}); "
                          f"pick one with --column")
    return numeric[0]


def label_flags(cells: list[str], lines: list[int], path: str, column: str) -> np.ndarray:
    """Per-point 0/1 labels as a bool array; anything else (empty, 2, 'yes') is refused."""
    flags = np.zeros(len(cells), dtype=bool)
    for k, (cell, line) in enumerate(zip(cells, lines)):
        value = float(cell) if is_number(cell) else math.nan
        if value not in (0.0, 1.0):
            raise SeriesError(f"{path}:{line}: label column {column!r} must hold 0 or 1, got {cell!r}")
        flags[k] = value == 1.0
    return flags


def fill_gaps(values: np.ndarray, path: str) -> tuple[np.ndarray, list[str]]:
    """Linear interpolation over NaN gaps (ends take the nearest value) and a note saying what was filled."""
    missing = np.isnan(values)
    if missing.sum() > values.size - 2:
        raise SeriesError(f"{path}: the value column holds fewer than two numbers")
    if not missing.any():
        return values, []
    gaps = runs(missing)
    known = np.flatnonzero(~missing)
    filled = values.copy()
    filled[missing] = np.interp(np.flatnonzero(missing), known, values[known])
    longest = max(e - s for s, e in gaps)
    return filled, [f"{path}: {int(missing.sum())} missing values in {len(gaps)} gaps (longest {longest}) "
                    f"filled by linear interpolation"]


# --------------------------------------------------------------------------------------------- labels


def time_keys(stamps: list[str], path: str) -> list:
    """Comparable keys of timestamp cells: floats when every cell is a number, else ISO 8601 datetimes (an
    aware time is taken in UTC, a naive one as written)."""
    if all(is_number(s) for s in stamps):
        return [float(s) for s in stamps]
    return [iso_time(s, path) for s in stamps]


def iso_time(text, path: str) -> datetime:
    """A timestamp string as a naive UTC-or-local datetime; SeriesError when it is not ISO 8601."""
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError:
        raise SeriesError(f"{path}: timestamp {text!r} is neither a number nor an ISO 8601 date") from None
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


def label_key(value, numeric: bool, path: str):
    """A label window end in the same key space as the series' timestamps."""
    if numeric:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and is_number(value):
            return float(value)
        raise SeriesError(f"{path}: label time {value!r} is not a number like the series' timestamps")
    if not isinstance(value, str):
        raise SeriesError(f"{path}: label time {value!r} is not a date like the series' timestamps")
    return iso_time(value, path)


def load_label_file(labels_path: str) -> dict:
    """The NAB-style labels JSON: {file name: [[start, end], ...]}; structure checked, values not yet."""
    try:
        with open(labels_path, encoding="utf-8") as fh:
            table = json.load(fh)
    except OSError as err:
        raise SeriesError(f"{labels_path}: cannot read the labels file ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise SeriesError(f"{labels_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(table, dict):
        raise SeriesError(f"{labels_path}: expected a JSON object mapping file names to label windows")
    for key, windows in table.items():
        if not isinstance(windows, list) or not all(isinstance(w, list) and len(w) == 2 for w in windows):
            raise SeriesError(f"{labels_path}: entry {key!r} must be a list of [start, end] pairs")
    return table


def label_entry(table: dict, labels_path: str, path: str) -> list:
    """The windows listed for ``path``: a key equal to its file name or to the tail of its path
    (NAB keys look like 'realKnownCause/nyc_taxi.csv')."""
    norm = os.path.normpath(os.path.abspath(path)).replace(os.sep, "/")
    base = os.path.basename(path)
    hits = [k for k in table if k == base or norm.endswith("/" + k.strip("/"))]
    if not hits:
        raise SeriesError(f"{path}: the labels file {labels_path} has no entry for {base!r}")
    if len(hits) > 1:
        raise SeriesError(f"{path}: the labels file {labels_path} has several entries for it ({', '.join(hits)})")
    return table[hits[0]]


def windows_to_intervals(windows: list, timestamps: list[str], path: str) -> list[list[int]]:
    """Inclusive [start, end] timestamp windows -> sorted half-open index intervals.

    Refuses a window outside the series' time range, a reversed or empty window, overlapping windows and
    timestamps that do not increase. Example: timestamps 0..9, window [2, 4] -> [[2, 5]].
    """
    keys = time_keys(timestamps, path)
    numeric = isinstance(keys[0], float)
    for k in range(1, len(keys)):
        if not keys[k] > keys[k - 1]:
            raise SeriesError(f"{path}: timestamps must increase to place label windows; "
                              f"{timestamps[k]!r} follows {timestamps[k - 1]!r}")
    spans = sorted((label_key(a, numeric, path), label_key(b, numeric, path), [a, b]) for a, b in windows)
    out, previous = [], None
    for start, end, raw in spans:
        if end < start:
            raise SeriesError(f"{path}: label window {raw} ends before it starts")
        if start < keys[0] or end > keys[-1]:
            raise SeriesError(f"{path}: label window {raw} lies outside the series "
                              f"({timestamps[0]} .. {timestamps[-1]})")
        if previous is not None and start <= previous[1]:
            raise SeriesError(f"{path}: label windows {previous[2]} and {raw} overlap")
        s, e = bisect_left(keys, start), bisect_right(keys, end)
        if s >= e:
            raise SeriesError(f"{path}: label window {raw} holds no point of the series")
        out.append([s, e])
        previous = (start, end, raw)
    return [list(iv) for iv in to_events(out, len(keys))]


# --------------------------------------------------------------------------------------------- reading


def layout(path: str, rows: list) -> tuple:
    """(header or None, data rows) of a file; every data row has the header's number of cells.

    A first row without any number is a header (it names the columns). Without a header only one column is
    readable (a plain CSV), or the two of a TSB-UAD .out file, whose first row must hold numbers.
    """
    is_out = path.lower().endswith(".out")
    if is_out:
        if not is_number(rows[0][1][0]):
            raise SeriesError(f"{path}: a TSB-UAD .out file has no header line; found {rows[0][1]}")
        header, body, width = None, rows, 2
    elif not any(is_number(c) for c in rows[0][1]):
        header, body = rows[0][1], rows[1:]
        width = len(header)
    elif len(rows[0][1]) == 1:
        header, body, width = None, rows, 1
    else:
        raise SeriesError(f"{path}: no header line and {len(rows[0][1])} columns; name the columns in a header "
                          f"(e.g. timestamp,value,is_anomaly), or save TSB-UAD value,label files as .out")
    if not body:
        raise SeriesError(f"{path}: a header but no data rows")
    if width == 1:  # an empty line inside a one-column file is a missing value
        body = [(line, cells or [""]) for line, cells in body]
    for line, cells in body:
        if len(cells) != width:
            raise SeriesError(f"{path}:{line}: {len(cells)} cells, expected {width}")
    return header, body


def column_roles(path: str, header, body, column: str | None) -> tuple:
    """(value, timestamp, label) column indices; the last two are None when the file has no such column."""
    if path.lower().endswith(".out"):
        if column is not None:
            raise SeriesError(f"{path}: a TSB-UAD .out file has no column names; --column applies to CSV headers")
        return 0, None, 1
    if header is None:
        return 0, None, None
    names = [h.lower() for h in header]
    k_time = next((k for k, h in enumerate(names) if h in TIME_COLUMNS), None)
    k_label = next((k for k, h in enumerate(names) if h in LABEL_COLUMNS), None)
    return pick_value_column(path, header, body, column), k_time, k_label


def read_values(path: str, body, k_value: int, name: str) -> tuple[np.ndarray, list[str]]:
    """The value column as floats with gaps filled, and the notes about the filling; a constant series is
    refused (it has no shape to detect and no scale to normalise by)."""
    values = np.array([parse_number(cells[k_value], f"{path}:{line} column {name}") for line, cells in body],
                      dtype=float)
    values, notes = fill_gaps(values, path)
    if values.max() == values.min():
        raise SeriesError(f"{path}: the series is constant (every value is {values[0]:g}); nothing to detect")
    return values, notes


def read_timestamps(path: str, body, k_time) -> list[str] | None:
    """The timestamp cells as written, or None without a timestamp column; an empty one is refused."""
    if k_time is None:
        return None
    empty = next((line for line, cells in body if not cells[k_time]), None)
    if empty is not None:
        raise SeriesError(f"{path}:{empty}: empty timestamp")
    return [cells[k_time] for _, cells in body]


def read_series(path: str, column: str | None = None, labels_path: str | None = None,
                labels_table: dict | None = None) -> RealSeries:
    """Read one file in any of the supported formats (module docstring) into a RealSeries.

    ``labels_table`` is the already loaded ``labels_path`` (read_all loads it once for a folder).
    """
    header, body = layout(path, read_rows(path))
    k_value, k_time, k_label = column_roles(path, header, body, column)
    value_name = header[k_value] if header else None
    values, notes = read_values(path, body, k_value, value_name or str(k_value + 1))
    timestamps = read_timestamps(path, body, k_time)
    intervals, fmt = None, "unlabelled"
    if k_label is not None:
        label_name = header[k_label] if header else "label"
        if labels_path is not None:
            raise SeriesError(f"{path}: the file has its own label column {label_name!r}; "
                              f"drop --labels or that column")
        flags = label_flags([cells[k_label] for _, cells in body], [line for line, _ in body], path, label_name)
        intervals, fmt = runs(flags), ("tsb-uad" if header is None else "timeeval")
    elif labels_path is not None:
        if timestamps is None:
            raise SeriesError(f"{path}: --labels gives timestamp windows, but the file has no timestamp column")
        table = labels_table if labels_table is not None else load_label_file(labels_path)
        intervals = windows_to_intervals(label_entry(table, labels_path, path), timestamps, path)
        fmt = "nab"
    return RealSeries(path=path, name=series_name(path), fmt=fmt, column=value_name, values=values,
                      timestamps=timestamps, intervals=intervals, notes=notes)


def read_all(path: str, column: str | None = None, labels_path: str | None = None) -> list[RealSeries]:
    """Every series under ``path`` (a file or a folder), all read and checked before anything is written."""
    table = load_label_file(labels_path) if labels_path is not None else None
    series = [read_series(f, column, labels_path, table) for f in series_files(path)]
    seen = {}
    for s in series:
        if s.name in seen:
            raise SeriesError(f"{s.path}: has the same name {s.name!r} as {seen[s.name]}; rename one of them")
        seen[s.name] = s.path
    return series


# --------------------------------------------------------------------------------------------- windows


def check_windowing(series: RealSeries, window: int, stride: int) -> None:
    """SeriesError unless MIN_WINDOW <= window <= N and 1 <= stride <= window (no index left out)."""
    if window < MIN_WINDOW:
        raise SeriesError(f"--window {window} is too short: the plots need at least {MIN_WINDOW} points")
    if not 1 <= stride <= window:
        raise SeriesError(f"--stride {stride} must be between 1 and the window ({window}), "
                          f"or some points would lie in no window")
    if series.length < window:
        hint = (f"pass --window {series.length} or less (at least {MIN_WINDOW})" if series.length >= MIN_WINDOW
                else f"the plots need at least {MIN_WINDOW} points")
        raise SeriesError(f"{series.path}: {series.length} points, shorter than one window (--window {window}); "
                          f"{hint}")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets 0, S, 2S, ... and a last one at N - L when the stride does not land there.

    Every window has exactly L points and every index lies in a window.
    Example: N = 2500, L = 1000, S = 1000 -> [0, 1000, 1500].
    """
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def cut_intervals(intervals, start: int, window: int) -> list[list[int]]:
    """The parts of series intervals inside [start, start + L), in window coordinates.

    Example: [[90, 130]] cut to the window at 100 of length 50 -> [[0, 30]].
    """
    out = []
    for s, e in intervals:
        lo, hi = max(s, start), min(e, start + window)
        if lo < hi:
            out.append([lo - start, hi - start])
    return out


def merge_windows(pieces, length: int) -> list[list[int]]:
    """Union of window-local intervals on the series' index: ``pieces`` is [(offset, intervals), ...].

    Overlapping or touching intervals join (metrics.to_events), so cutting intervals into windows and
    merging them back gives the same intervals. Example: [(0, [[90, 100]]), (50, [[40, 60]])] -> [[90, 110]].
    """
    shifted = [[offset + s, offset + e] for offset, intervals in pieces for s, e in intervals]
    return [list(iv) for iv in to_events(shifted, length)]


def normalise_window(values) -> np.ndarray:
    """Min-max scale to [-1, 1] (NORMALISATION); a flat window becomes all 0."""
    x = np.asarray(values, dtype=float)
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi == lo else 2.0 * (x - lo) / (hi - lo) - 1.0


def timestamp_spans(intervals, timestamps) -> list | None:
    """[first, last] timestamps of each half-open interval (inclusive, as NAB writes windows), or None."""
    if timestamps is None:
        return None
    return [[timestamps[s], timestamps[e - 1]] for s, e in intervals]


# --------------------------------------------------------------------------------------------- flags


def add_window_flags(parser, what: str) -> None:
    """--window/--stride/--column/--labels, shared by data_gen.py --suite series and eval.py --series."""
    parser.add_argument("--window", type=int, default=None,
                        help=f"{what}: points per plot (default {DEFAULT_WINDOW}, the training length; at least "
                             f"{MIN_WINDOW}); each window is min-max scaled to [-1, 1]")
    parser.add_argument("--stride", type=int, default=None,
                        help=f"{what}: offset between window starts, 1..window (default: window // 2); a last "
                             f"window is added at the end, so every point lies in a window")
    parser.add_argument("--column", default=None,
                        help=f"{what}: the value column to read when a CSV header names several")
    parser.add_argument("--labels", default=None,
                        help=f"{what}: NAB-style JSON mapping file names to [[start_timestamp, end_timestamp], "
                             f"...] windows (both ends inclusive); CSV files with an is_anomaly or label column "
                             f"and .out files carry their own labels")


def check_window_flags(parser, args, series_mode: bool, what: str, extra=()) -> None:
    """Argparse error for a series flag used outside series mode; fills in the default window and stride."""
    names = ("window", "stride", "column", "labels") + tuple(extra)
    used = [f"--{name}" for name in names if getattr(args, name, None) is not None]
    if not series_mode and used:
        parser.error(f"{', '.join(used)}: only with {what}")
    args.window = DEFAULT_WINDOW if args.window is None else args.window
    args.stride = max(1, args.window // 2) if args.stride is None else args.stride


# --------------------------------------------------------------------------------------------- samples


def window_sample(series: RealSeries, start: int, window: int) -> tuple:
    """(Sample, png bytes, manifest record) of the window of ``series`` at offset ``start``.

    The class of a real anomaly is unknown: a window holding labelled anomalies gets label UNKNOWN, one
    without gets 'normal' (the labels say nothing is there), and every window of an unlabelled series gets
    UNKNOWN with intervals None. There is no ground-truth-conditioned reasoning (expcot, gencot are empty).
    """
    raw = series.values[start:start + window]
    stored = np.round(normalise_window(raw), data_gen.SERIES_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if series.intervals is None:
        intervals, label = None, data_gen.UNKNOWN
    else:
        intervals = cut_intervals(series.intervals, start, window)
        label = data_gen.UNKNOWN if intervals else "normal"
    sid = f"{series.name}-{start:07d}"
    sample = data_gen.Sample(id=sid, family=series.name, label=label, length=window, intervals=intervals,
                             series=stored.tolist(), image=f"images/{sid}.png", expcot="", gencot="")
    png = png_bytes(data_gen.render_indexed(sample.series, ylim=SERIES_YLIM))
    record = {"id": sid, "offset": start, "min": float(raw.min()), "max": float(raw.max())}
    return sample, png, record


def source_record(series: RealSeries, labels_path: str | None, windows: list) -> dict:
    """What the manifest says about one source file."""
    return {"file": series.path, "name": series.name, "format": series.fmt, "column": series.column,
            "length": series.length, "labelled": series.intervals is not None,
            "labels_file": labels_path if series.fmt == "nab" else None,
            "has_timestamps": series.timestamps is not None, "intervals": series.intervals,
            "notes": series.notes, "windows": windows}


def write_windows(out_dir: str, series_list: list, window: int, stride: int, labels_path: str | None = None,
                  progress: bool = False) -> tuple[list, dict]:
    """Write DIR/images/<id>.png, DIR/samples.jsonl and DIR/manifest.json for every window of every series.

    Checks every series' windowing first, so a bad one writes nothing. Returns (samples, manifest).
    """
    for series in series_list:
        check_windowing(series, window, stride)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    samples, sources = [], []
    total = sum(len(window_starts(s.length, window, stride)) for s in series_list)
    bar = progress_bar(total=total, desc="windows", unit="plot", disable=not progress)
    for series in series_list:
        records = []
        for start in window_starts(series.length, window, stride):
            sample, png, record = window_sample(series, start, window)
            write_atomic(os.path.join(out_dir, sample.image), png)
            samples.append(sample)
            records.append(record)
            bar.update()
        sources.append(source_record(series, labels_path, records))
    bar.close()
    write_atomic(os.path.join(out_dir, "samples.jsonl"),
                          "".join(s.to_json() + "\n" for s in samples).encode("utf-8"))
    manifest = series_manifest(window, stride, samples, sources)
    write_atomic(os.path.join(out_dir, "manifest.json"),
                          (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return samples, manifest


def series_manifest(window: int, stride: int, samples: list, sources: list) -> dict:
    """manifest.json of an imported folder (deterministic: no timestamps of the import itself)."""
    by_label = {}
    for s in samples:
        by_label[s.label] = by_label.get(s.label, 0) + 1
    return {
        "version": data_gen.DATA_VERSION, "suite": data_gen.SERIES_SUITE, "window": window, "stride": stride,
        "normalisation": NORMALISATION, "render": data_gen.render_settings(data_gen.SERIES_SUITE, window),
        "fields": list(data_gen.SAMPLE_FIELDS), "intervals": "half-open [s, e) integer indices",
        "classes": (f"real anomalies have an unknown class: label {data_gen.UNKNOWN!r} (intervals null when the "
                    f"source has no labels); a labelled window without anomaly is 'normal'"),
        "merge": "union of the windows' intervals shifted by their offsets",
        "counts": {"total": len(samples), "sources": len(sources), "by_label": by_label},
        "sources": sources,
    }
