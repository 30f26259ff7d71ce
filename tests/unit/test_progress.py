"""Progress of long phases: bars on a terminal, rate-limited log lines elsewhere (ray job logs)."""

import io
import logging

import pytest

from gmai_rl.config import DashboardsConfig
from gmai_rl.progress import Progress, format_postfix, phase_line, resolve_mode


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_bars_on_a_terminal_and_lines_elsewhere():
    assert resolve_mode("auto", is_terminal=True) == "bars"
    assert resolve_mode("auto", is_terminal=False) == "lines"
    assert resolve_mode("off", is_terminal=True) == "off"
    assert resolve_mode("bars", is_terminal=False) == "bars"
    with pytest.raises(ValueError, match=r"dashboards.progress='spinner'.*'lines'"):
        resolve_mode("spinner", is_terminal=False)
    assert Progress("x", 3, stream=Terminal()).mode == "bars"
    assert Progress("x", 3, stream=io.StringIO()).mode == "lines"


def test_a_line_has_count_percentage_elapsed_eta_rate_and_postfix():
    line = phase_line("rl", 12, 120, 62.4, "step", {"reward": 0.41234, "acc": 1 / 3})
    assert line == "rl: 12/120 (10%) elapsed 01:02, ETA 09:21, 5.20s/step, reward=0.412, acc=0.333"
    assert (
        phase_line("loading", 5, None, 10.0, "record") == "loading: 5 elapsed 00:10, 2.00s/record"
    )
    assert format_postfix({"loss": 2.0, "note": "x"}) == "loss=2, note=x"


def test_lines_come_at_most_every_interval_and_at_the_end(caplog):
    clock = FakeClock()
    bar = Progress("sft", 5, unit="step", mode="lines", interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="gmai_rl.progress"):
        clock.now += 10
        bar.update(loss=1.5)  # 10 s in: too soon
        clock.now += 25
        bar.update(loss=1.0)  # 35 s since the start: a line
        clock.now += 5
        bar.update(2)  # 5 s since the last line: too soon
        clock.now += 1
        bar.update()  # the last unit: always a line
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sft: 2/5 (40%) elapsed 00:35, ETA 00:52, 17.50s/step, loss=1",
        "sft: 5/5 (100%) elapsed 00:41, ETA 00:00, 8.20s/step, loss=1",
    ]
    assert not any("\r" in line for line in lines)


def test_off_writes_nothing_and_bars_redraw_on_the_stream(caplog):
    with (
        caplog.at_level(logging.INFO, logger="gmai_rl.progress"),
        Progress("eval", 2, mode="off") as bar,
    ):
        bar.update(2)
    assert caplog.records == []
    terminal = Terminal()
    with Progress("rl", 2, unit="step", stream=terminal) as bar:
        bar.update(reward=0.5)
        bar.update(reward=0.75)
    assert "rl: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert "reward=0.75" in terminal.getvalue()


def test_advance_to_takes_the_total_from_the_callback(caplog):
    bar = Progress("images", None, mode="lines", interval_s=1e9, clock=FakeClock())
    with caplog.at_level(logging.INFO, logger="gmai_rl.progress"):
        bar.advance_to(3, 4)
        bar.advance_to(4, 4)
    assert bar.total == 4 and bar.done == 4
    assert [r.getMessage().split(" elapsed")[0] for r in caplog.records] == ["images: 4/4 (100%)"]


def test_the_config_section_sets_mode_and_interval():
    bar = Progress.of(DashboardsConfig(progress="off", progress_interval_s=5.0), "x", 1)
    assert bar.mode == "off" and bar.interval_s == 5.0
