"""Real univariate series in, plots out, intervals back onto the series' own index.

Reading (``read_series``), one file or every readable file of a folder (``read_all``):
  * TimeEval / GutenTAG CSV: a header ``timestamp,value,is_anomaly``; several value columns are allowed when
    ``--column`` names the one to read;
  * TSB-UAD ``.out``: two columns ``value,label`` and no header;
  * NAB: ``timestamp,value`` CSV files, the label windows in a JSON file (``--labels``) mapping each file name
    to ``[[start_timestamp, end_timestamp], ...]`` (both ends inclusive, as NAB writes them);
  * TSB-AD (TSB-AD-U) CSV: a header ``Data,Label``, read like TimeEval's (any value column name, a label column
    named is_anomaly, label or anomaly);
  * UCR anomaly archive ``.txt``: values only, the one anomaly in the file name
    ``NNN_UCR_Anomaly_<name>_<train end>_<begin>_<end>.txt``, read as [begin, end) on the 0-based index;
  * a plain one-column CSV (with or without a header line): no labels, detection only.
Point labels and label windows become half-open [s, e) index intervals, like everywhere in the project.
NAB windows are placed row by row by timestamp (a repeated or backward timestamp only earns a warning).
A folder is read file by file: each refused file is reported with its reason, and --skip-bad uses the rest.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

import data_gen
import expert_cot
from expert_cot import interval_mask, runs
from timerpo.cli import usage_error
from timerpo.files import png_bytes, write_atomic
from timerpo.metrics import to_events
from timerpo.progress import progress_bar
from timerpo.prompt import generic_cot

DEFAULT_WINDOW = data_gen.SERIES_WINDOW  # the training length: one pixel column per step
MIN_WINDOW = data_gen.SERIES_MIN_WINDOW  # expert_cot.StagedScan.MIN_LENGTH (the detector's minimum)
SUFFIXES = (".csv", ".out")
# UCR anomaly archive: values only, the one anomaly in the name: NNN_UCR_Anomaly_<name>_<train end>_<begin>_<end>.txt
UCR_NAME = re.compile(r"_(\d+)_(\d+)_(\d+)\.txt$", re.IGNORECASE)
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
    fmt: str  # "timeeval" (also TSB-AD), "tsb-uad", "nab", "ucr", "unlabelled" or "array" (timerpo.detect)
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


def readable_name(name: str) -> bool:
    """A .csv or .out file, or a .txt file named as in the UCR anomaly archive."""
    return name.lower().endswith(SUFFIXES) or UCR_NAME.search(name) is not None


def series_files(path: str) -> list[str]:
    """The file itself, or the readable files directly inside a folder (readable_name), sorted by name."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if readable_name(f) and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise SeriesError(f"{path}: no .csv, .out or UCR .txt files in this folder")
        return files
    if not os.path.isfile(path):
        raise SeriesError(f"{path}: no such file or folder")
    if not readable_name(os.path.basename(path)):
        raise SeriesError(f"{path}: unsupported file type; expected .csv (TimeEval/GutenTAG, TSB-AD, NAB or one "
                          f"column), .out (TSB-UAD value,label) or a UCR archive file "
                          f"NNN_UCR_Anomaly_<name>_<train end>_<begin>_<end>.txt")
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


def label_keys(table: dict, path: str) -> list[str]:
    """Keys of the labels table naming ``path``: its file name or the tail of its path, else (for a folder
    laid out differently from NAB's 'realKnownCause/nyc_taxi.csv') a key with the same file name."""
    norm = os.path.normpath(os.path.abspath(path)).replace(os.sep, "/")
    base = os.path.basename(path)
    hits = [k for k in table if k == base or norm.endswith("/" + k.strip("/"))]
    return hits or [k for k in table if k.replace("\\", "/").rsplit("/", 1)[-1] == base]


def label_entry(table: dict, labels_path: str, path: str) -> list:
    """The windows listed for ``path`` (label_keys); SeriesError without exactly one entry."""
    hits = label_keys(table, path)
    if not hits:
        raise SeriesError(f"{path}: the labels file {labels_path} has no entry for {os.path.basename(path)!r}")
    if len(hits) > 1:
        raise SeriesError(f"{path}: the labels file {labels_path} has several entries for it ({', '.join(hits)})")
    return table[hits[0]]


def windows_to_intervals(windows: list, timestamps: list[str], path: str) -> tuple[list[list[int]], list[str]]:
    """Inclusive [start, end] timestamp windows -> (sorted half-open index intervals, notes).

    A row is anomalous when its timestamp lies inside a window, row by row, as NAB's scorer places its
    windows: a repeated hour or a clock going back (daylight saving) changes nothing for the other rows, and
    a note counts the rows out of order. Refuses a window outside the series' time range, a reversed window,
    one holding no row, and overlapping windows. Example: timestamps 0..9, window [2, 4] -> [[2, 5]].
    """
    keys = time_keys(timestamps, path)
    numeric = isinstance(keys[0], float)
    spans = sorted((label_key(a, numeric, path), label_key(b, numeric, path), [a, b]) for a, b in windows)
    first, last = min(keys), max(keys)
    as_array = np.asarray(keys, dtype=float if numeric else "datetime64[us]")  # [N]
    inside = np.zeros(len(keys), dtype=bool)
    previous = None
    for start, end, raw in spans:
        if end < start:
            raise SeriesError(f"{path}: label window {raw} ends before it starts")
        if start < first or end > last:
            raise SeriesError(f"{path}: label window {raw} lies outside the series "
                              f"({timestamps[keys.index(first)]} .. {timestamps[keys.index(last)]})")
        if previous is not None and start <= previous[1]:
            raise SeriesError(f"{path}: label windows {previous[2]} and {raw} overlap")
        lo, hi = (start, end) if numeric else (np.datetime64(start, "us"), np.datetime64(end, "us"))
        rows = (as_array >= lo) & (as_array <= hi)  # [N]
        if not rows.any():
            raise SeriesError(f"{path}: label window {raw} holds no point of the series")
        inside |= rows
        previous = (start, end, raw)
    unordered = int((as_array[1:] <= np.maximum.accumulate(as_array)[:-1]).sum())  # not after every earlier row
    notes = [] if not unordered else [
        f"{path}: {unordered} rows have a timestamp not after an earlier row's (repeated or going back); label "
        f"windows are placed row by row, by whether each row's timestamp lies inside a window"]
    return runs(inside), notes


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
    return usable_values(values, path)


def usable_values(values: np.ndarray, path: str) -> tuple[np.ndarray, list[str]]:
    """Gaps (NaN) filled, with the note saying so; a constant series is refused."""
    values, notes = fill_gaps(values, path)
    if values.max() == values.min():
        raise SeriesError(f"{path}: the series is constant (every value is {values[0]:g}); nothing to detect")
    return values, notes


def from_values(values, name: str = "series") -> RealSeries:
    """An unlabelled RealSeries from numbers in memory (timerpo.detect); NaN gaps are filled as in files."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise SeriesError(f"{name}: expected a 1-D array of values, got shape {x.shape}")
    if np.isinf(x).any():
        raise SeriesError(f"{name}: {int(np.isinf(x).sum())} values are infinite")
    x, notes = usable_values(x, name)
    return RealSeries(path=name, name=name, fmt="array", column=None, values=x, timestamps=None, intervals=None,
                      notes=notes)


def read_timestamps(path: str, body, k_time) -> list[str] | None:
    """The timestamp cells as written, or None without a timestamp column; an empty one is refused."""
    if k_time is None:
        return None
    empty = next((line for line, cells in body if not cells[k_time]), None)
    if empty is not None:
        raise SeriesError(f"{path}:{empty}: empty timestamp")
    return [cells[k_time] for _, cells in body]


def read_ucr(path: str, column: str | None, labels_path: str | None) -> RealSeries:
    """A UCR anomaly archive .txt file: whitespace-separated numbers (one per line, or all on one line), the
    anomaly [begin, end) from the name, on the whole file's 0-based index (its training part included)."""
    if column is not None or labels_path is not None:
        raise SeriesError(f"{path}: a UCR archive file has no columns and labels itself in its name; drop "
                          f"--column / --labels")
    try:
        with open(path, encoding="utf-8") as fh:
            cells = fh.read().split()
    except (OSError, UnicodeDecodeError) as err:
        raise SeriesError(f"{path}: cannot be read as text ({err})") from None
    if not cells:
        raise SeriesError(f"{path}: the file holds no values")
    values, notes = usable_values(np.array([parse_number(c, f"{path}: value {k + 1}") for k, c in enumerate(cells)],
                                           dtype=float), path)
    _, begin, end = (int(g) for g in UCR_NAME.search(os.path.basename(path)).groups())
    if not 0 <= begin < end <= values.size:
        raise SeriesError(f"{path}: the anomaly [{begin}, {end}) named in the file name lies outside its "
                          f"{values.size} values")
    return RealSeries(path=path, name=series_name(path), fmt="ucr", column=None, values=values, timestamps=None,
                      intervals=[[begin, end]], notes=notes)


def own_labels(path: str) -> bool:
    """Whether the file carries labels itself: a UCR name, a .out file, or a CSV header with a label column."""
    if UCR_NAME.search(os.path.basename(path)) or path.lower().endswith(".out"):
        return True
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False  # read_series says what is wrong with it
    return any(c.strip().lower() in LABEL_COLUMNS for c in header)


def read_series(path: str, column: str | None = None, labels_path: str | None = None,
                labels_table: dict | None = None) -> RealSeries:
    """Read one file in any of the supported formats (module docstring) into a RealSeries.

    ``labels_table`` is the already loaded ``labels_path`` (read_all loads it once for a folder).
    """
    if labels_path is not None and labels_table is not None and not label_keys(labels_table, path) \
            and own_labels(path):
        labels_path = None  # a folder mixing formats: --labels is for the files without labels of their own
    if UCR_NAME.search(os.path.basename(path)):
        return read_ucr(path, column, labels_path)
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
        intervals, label_notes = windows_to_intervals(label_entry(table, labels_path, path), timestamps, path)
        notes, fmt = notes + label_notes, "nab"
    return RealSeries(path=path, name=series_name(path), fmt=fmt, column=value_name, values=values,
                      timestamps=timestamps, intervals=intervals, notes=notes)


def read_all(path, column: str | None = None, labels_path: str | None = None, window: int | None = None,
             stride: int | None = None, skip_bad: bool = False) -> tuple[list[RealSeries], list[dict]]:
    """Every series of ``path`` (a file, a folder, or a list of both), read and, with ``window``, its windowing
    checked, all before anything is written. Returns (usable series, refused files as {"file", "reason"}).

    A single file that cannot be used raises its SeriesError. Of several files, each refused one is
    collected with its reason; unless ``skip_bad``, any refusal then raises a SeriesError whose ``refused``
    lists them all (the caller prints one line per file, report_refusals).
    """
    files = [f for p in ([path] if isinstance(path, str) else path) for f in series_files(p)]
    table = load_label_file(labels_path) if labels_path is not None else None
    series, refused = [], []
    for f in files:
        try:
            s = read_series(f, column, labels_path, table)
            if window is not None:
                check_windowing(s, window, stride)
        except SeriesError as err:
            if len(files) == 1:
                raise
            refused.append({"file": f, "reason": str(err)})
            continue
        series.append(s)
    if not series or (refused and not skip_bad):
        err = SeriesError(f"none of the {len(files)} files can be used (listed above)" if not series else
                          f"{len(refused)} of {len(files)} files refused (listed above); pass --skip-bad to use "
                          f"the other {len(series)}")
        err.refused = refused
        raise err
    check_names(series)
    return series, refused


def check_names(series: list[RealSeries]) -> None:
    """SeriesError when two files would give windows of the same name (their ids would collide)."""
    seen = {}
    for s in series:
        if s.name in seen:
            raise SeriesError(f"{s.path}: has the same name {s.name!r} as {seen[s.name]}; rename one of them")
        seen[s.name] = s.path


def report_refusals(err: SeriesError | None, refused: list[dict], tool: str = "") -> None:
    """One stderr line per refused file (``refused:`` or, with --skip-bad, ``skipped:``), then the error
    (timerpo.cli.usage_error); each line after ``tool: `` when given."""
    import sys

    for r in getattr(err, "refused", refused):
        print(f"{tool + ': ' if tool else ''}{'refused' if err is not None else 'skipped'}: {r['reason']}",
              file=sys.stderr)
    if err is not None:
        usage_error(err, tool)


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


def spread_scores(pieces, length: int) -> np.ndarray:
    """Per-point scores on the series' index: each point's mean over the windows that contain it.

    ``pieces`` is [(offset, window scores [L]), ...] and every index lies in a window (window_starts).
    Example: length 4, [(0, [1, 1, 0]), (1, [0, 0, 1])] -> [1, 0.5, 0, 1].
    """
    total, count = np.zeros(length), np.zeros(length)  # [N], [N]
    for offset, scores in pieces:
        scores = np.asarray(scores, dtype=float)
        total[offset:offset + scores.size] += scores
        count[offset:offset + scores.size] += 1
    if not count.all():
        raise ValueError(f"points {runs(count == 0)} lie in no window")
    return total / count


def scores_csv(series: RealSeries, scores: np.ndarray) -> str:
    """scores.csv text: index, timestamp (empty without one), score, label (empty when unlabelled)."""
    import io

    labels = None if series.intervals is None else interval_mask(series.length, series.intervals)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "timestamp", "score", "label"])
    for k, score in enumerate(scores):
        writer.writerow([k, "" if series.timestamps is None else series.timestamps[k], f"{score:.6g}",
                         "" if labels is None else int(labels[k])])
    return out.getvalue()


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


def check_window_flags(parser, args, series_mode: bool, what: str, extra=()) -> None:
    """Argparse error for a series flag (data_gen.WindowFlags) used outside series mode; fills in the default
    window and stride."""
    names = ("window", "stride", "column", "labels", "skip_bad") + tuple(extra)
    used = [f"--{name}" for name in names if getattr(args, name, None) is not None]
    if not series_mode and used:
        parser.error(f"{', '.join(used)}: only with {what}")
    args.window = DEFAULT_WINDOW if args.window is None else args.window
    args.stride = max(1, args.window // 2) if args.stride is None else args.stride
    args.skip_bad = bool(args.skip_bad)


# --------------------------------------------------------------------------------------------- samples


def window_sample(series: RealSeries, start: int, window: int, with_expcot: bool = False) -> tuple:
    """(Sample, png bytes, manifest record) of the window of ``series`` at offset ``start``.

    The class of a real anomaly is unknown: a window holding labelled anomalies gets label UNKNOWN, one
    without gets 'normal' (the labels say nothing is there), and every window of an unlabelled series gets
    UNKNOWN with intervals None. ``with_expcot`` (an import for training) writes the ExpCoT of a labelled
    window from its stored values and true intervals, as for generated data (expert_cot.py; an UNKNOWN one
    names no type), and the generic reasoning; otherwise both are empty.
    """
    raw = series.values[start:start + window]
    stored = np.round(normalise_window(raw), data_gen.SERIES_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if series.intervals is None:
        intervals, label = None, data_gen.UNKNOWN
    else:
        intervals = cut_intervals(series.intervals, start, window)
        label = data_gen.UNKNOWN if intervals else "normal"
    expcot = gencot = ""
    if with_expcot and intervals is not None:
        expcot, gencot = expert_cot.expert_cot(stored, intervals, label), generic_cot()
    sid = f"{series.name}-{start:07d}"
    sample = data_gen.Sample(id=sid, family=series.name, label=label, length=window, intervals=intervals,
                             series=stored.tolist(), image=f"images/{sid}.png", expcot=expcot, gencot=gencot)
    png = png_bytes(data_gen.render_indexed(sample.series, ylim=SERIES_YLIM))
    record = {"id": sid, "offset": start, "min": float(raw.min()), "max": float(raw.max())}
    return sample, png, record


def cut_windows(series: RealSeries, window: int, stride: int, with_expcot: bool = False) -> list[tuple]:
    """window_sample for every window of ``series``, in offset order."""
    return [window_sample(series, start, window, with_expcot) for start in window_starts(series.length, window, stride)]


def source_record(series: RealSeries, labels_path: str | None, windows: list) -> dict:
    """What the manifest says about one source file."""
    return {"file": series.path, "name": series.name, "format": series.fmt, "column": series.column,
            "length": series.length, "labelled": series.intervals is not None,
            "labels_file": labels_path if series.fmt == "nab" else None,
            "has_timestamps": series.timestamps is not None, "intervals": series.intervals,
            "notes": series.notes, "windows": windows}


def write_windows(out_dir: str, series_list: list, window: int, stride: int, labels_path: str | None = None,
                  progress: bool = False, with_expcot: bool = False, skipped: list | None = None,
                  cut: dict | None = None) -> tuple[list, dict]:
    """Write DIR/images/<id>.png, DIR/samples.jsonl and DIR/manifest.json for every window of every series.

    Checks every series' windowing first, so a bad one writes nothing. ``skipped`` (files refused under
    --skip-bad) goes into the manifest; ``cut`` maps a series name to its already cut windows (cut_windows).
    Returns (samples, manifest).
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
            k = len(records)
            sample, png, record = (cut[series.name][k] if cut and series.name in cut
                                   else window_sample(series, start, window, with_expcot))
            write_atomic(os.path.join(out_dir, sample.image), png)
            samples.append(sample)
            records.append(record)
            bar.update()
        sources.append(source_record(series, labels_path, records))
    bar.close()
    write_atomic(os.path.join(out_dir, "samples.jsonl"),
                 "".join(s.to_json() + "\n" for s in samples).encode("utf-8"))
    manifest = series_manifest(window, stride, samples, sources, skipped or [], with_expcot)
    write_atomic(os.path.join(out_dir, "manifest.json"),
                 (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return samples, manifest


def series_manifest(window: int, stride: int, samples: list, sources: list, skipped: list,
                    with_expcot: bool) -> dict:
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
        "expcot": ("ExpCoT of every labelled window from its stored values and true intervals (expert_cot.py)"
                   if with_expcot else "none"),
        **({"expcot_version": expert_cot.EXPCOT_VERSION} if with_expcot else {}),
        "counts": {"total": len(samples), "sources": len(sources), "by_label": by_label},
        "sources": sources, "skipped": skipped,
    }
