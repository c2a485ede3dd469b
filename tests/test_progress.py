"""Progress bars in a log file are whole lines; on a terminal they redraw in place (timerpo/progress.py)."""
import io

from timerpo.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_bar(stream):
    bar = progress_bar(range(5), file=stream, desc="steps", log_seconds=0)
    for _ in bar:
        bar.set_postfix(loss="0.1", refresh=False)
    return stream.getvalue()


def test_a_bar_in_a_log_file_writes_one_whole_line_per_update():
    text = run_bar(io.StringIO())  # not a terminal
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("steps:   0%|") and all(line.startswith("steps: ") for line in lines)
    assert [line.split("|")[2].split()[0] for line in lines[:6]] == [f"{k}/5" for k in range(6)]
    assert len(lines) <= 7  # one per update, and the final state once more at most


def test_a_bar_on_a_terminal_redraws_in_place():
    assert "\r" in run_bar(Terminal())
