"""Progress of a long phase (data preparation, SFT, RL steps, evaluation) with its ETA.

On a terminal a phase is a tqdm bar on stderr, redrawn in place; log records printed meanwhile go
through tqdm so the bar stays whole. Anywhere else (`ray job logs`, output sent to a file) a
redrawn bar is a carriage-return stream that log viewers show as one ever-growing line or as
hundreds of near-identical ones, so the phase writes a plain log line instead, at most every
`interval_s` seconds and once at its end, with tqdm's own count, rate and ETA formatting.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TextIO

from gmai_rl.config import DashboardsConfig, ProgressMode

log = logging.getLogger(__name__)

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) elapsed {elapsed}, ETA {remaining}, {rate_fmt}{postfix}"
"""A progress line of a phase of known length (tqdm's bar_format fields)."""
OPEN_LINE_FORMAT = "{desc}: {n_fmt} elapsed {elapsed}, {rate_fmt}{postfix}"
"""... of unknown length."""


def resolve_mode(mode: str, is_terminal: bool) -> str:
    """bars, lines or off: auto becomes bars on a terminal, lines elsewhere."""
    if mode == ProgressMode.auto:
        return str(ProgressMode.bars if is_terminal else ProgressMode.lines)
    allowed = [m.value for m in ProgressMode]
    if mode not in allowed:
        raise ValueError(f"dashboards.progress={mode!r}: expected one of {allowed}")
    return str(mode)


def phase_line(
    desc: str,
    done: int,
    total: int | None,
    elapsed_s: float,
    unit: str = "it",
    postfix: dict[str, Any] | None = None,
) -> str:
    """One line: "rl: 12/120 (10%) elapsed 01:02, ETA 09:21, 5.20s/step, reward=0.41"."""
    from tqdm import tqdm

    line = tqdm.format_meter(
        done,
        total,
        elapsed_s,
        prefix=desc,
        unit=unit,
        postfix=format_postfix(postfix) or None,
        bar_format=LINE_FORMAT if total else OPEN_LINE_FORMAT,
    )
    return " ".join(line.split())  # tqdm pads the rate to a fixed width


def format_postfix(values: dict[str, Any] | None) -> str:
    """ "reward=0.412, acc=0.330": floats to 3 significant digits, anything else as it prints."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (values or {}).items()
    )


class Progress(AbstractContextManager["Progress"]):
    """One phase's progress: `update(n, **postfix)` as work completes, `close()` (or a `with`
    block) at the end."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        unit: str = "it",
        mode: str = ProgressMode.auto,
        interval_s: float = 30.0,
        leave: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, _is_terminal(self.stream))
        self.interval_s, self.clock = interval_s, clock
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = clock()
        self.lines_written = 0
        self._bar: Any = None
        self._redirect: Any = None
        if self.mode == ProgressMode.bars:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                file=self.stream,
                leave=leave,
                dynamic_ncols=True,
                mininterval=1.0,
            )

    @classmethod
    def of(cls, dash: DashboardsConfig, desc: str, total: int | None, **kwargs: Any) -> Progress:
        """A phase shown as the run's `dashboards` section says."""
        return cls(desc, total, mode=dash.progress, interval_s=dash.progress_interval_s, **kwargs)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """`n` more units done; `postfix` values are shown after the ETA from now on."""
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(format_postfix(self.postfix), refresh=False)
            self._bar.update(n)
        elif self.mode == ProgressMode.lines:
            now = self.clock()
            finished = self.total is not None and self.done >= self.total
            if finished or now - self.last_line >= self.interval_s:
                self.last_line = now
                self.lines_written += 1
                log.info(
                    "%s",
                    phase_line(
                        self.desc,
                        self.done,
                        self.total,
                        now - self.started,
                        self.unit,
                        self.postfix,
                    ),
                )

    def advance_to(self, done: int, total: int | None = None) -> None:
        """`done` units done in all, of `total` if given (for callbacks that count themselves)."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self.update(done - self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or bare stream
        return False
