"""Progress bars that also read well in a log file, and silence for the libraries' own bars.

On a terminal a tqdm bar redraws itself in place with carriage returns. Written to a file or a pipe, those
redraws pile up into one endless line, so there every redraw becomes a whole line of its own instead, at most
one every `log_seconds` (the RL loop asks for one per step).
"""
from __future__ import annotations

import re
import sys

from tqdm import tqdm

LOG_SECONDS = 10.0  # at most one line per bar this often in a log file
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor for nested bars


class LogLines:
    """A stream for tqdm that turns its in-place redraws into whole lines; blank and repeated ones are dropped."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        for part in re.split(r"[\r\n]", text):  # tqdm writes "\r" + bar: the bar is what follows each return
            line = ANSI_ESCAPE.sub("", part).rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable=None, *, file=None, log_seconds: float = LOG_SECONDS, **kwargs) -> tqdm:
    """A tqdm bar on `file` (default stderr): redrawn in place on a terminal, else one line per update (at
    most one every `log_seconds`, and the final state)."""
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    kwargs["leave"] = True  # a log keeps the final state of every bar
    return tqdm(iterable, file=LogLines(stream), mininterval=log_seconds, **kwargs)


def quiet_library_bars() -> None:
    """Switch off the bars of transformers (loading and saving weights) and of huggingface_hub."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    disable_progress_bars()
