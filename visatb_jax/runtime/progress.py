"""Progress of a long loop: a tqdm bar on a terminal, plain lines in a log.

`Progress(total, desc=...)` decides once, when made, by `stream.isatty()` (default stream:
`sys.stdout`):

- a terminal: a tqdm bar, as before (`disable=None`: tqdm shows it only where its own stream,
  stderr, is a terminal too); no plain lines, so nothing is said twice;
- anything else (a file, a pipe, `tee`, a cluster job's log): no bar, and a plain line, flushed at
  once, after every `every` units and after the last one, e.g.

      train step 40/131 (31 %): loss 1.234, 2.1 steps/s, ETA 0:43

Line schedule: `every = min(ceil(total / 10), max_every)` (`max_every` = 100 by default), counted
on the absolute position, so a line every 10 % of the run or every 100 units, whichever comes
first, plus one at the end: a 15-step run prints 8 lines (2, 4, ..., 14, 15), a 131-step run 10,
a 3,700-step run 37 and a 3-task evaluation 3. The rate (units/s) counts only the units done
since the first one of this call, so a first step that compiles, or the steps before a resume,
do not skew it; the ETA is the units left at that rate. The last line gives the time taken
instead of an ETA.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

DEFAULT_MAX_EVERY = 100


def line_every(total: int, max_every: int = DEFAULT_MAX_EVERY) -> int:
  """Units between two plain lines: every 10 % of `total`, or every `max_every`, if fewer."""
  return max(1, min(math.ceil(max(total, 1) / 10), max_every))


def format_duration(seconds: float) -> str:
  """`M:SS` below an hour, else `H:MM:SS` (rounded to the second): 43 → 0:43, 3725 → 1:02:05."""
  s = max(0, int(round(seconds)))
  h, rest = divmod(s, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def plural(unit: str) -> str:
  """step → steps, batch → batches (the rate's unit)."""
  return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _is_terminal(stream: TextIO) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class Progress:
  """A loop's progress (see the module's docstring): `update(n, **fields)` after each unit.

  Args:
    total: units of the whole run (steps, batches).
    desc: what runs ("train", "untrained on validation").
    unit: one unit's name; its plural names the rate.
    initial: units already done (a resumed run).
    stream: where plain lines go, and whose `isatty()` picks the bar or the lines; default
      `sys.stdout`, read when made.
    clock: seconds, monotonic; injectable for tests.
    max_every: see `line_every`.
    lines: False: no plain lines (e.g. every process but the first of a multi-host run); the
      bar is unaffected.
    leave: tqdm's `leave`: keep the bar on the terminal once closed.
  """

  def __init__(self, total: int, *, desc: str, unit: str = "step", initial: int = 0,
               stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
               max_every: int = DEFAULT_MAX_EVERY, lines: bool = True, leave: bool = True):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.done = self.start = int(initial)
    self.stream = sys.stdout if stream is None else stream
    self.clock = clock
    self.every = line_every(self.total, max_every)
    self.fields: dict[str, str] = {}
    self.terminal = _is_terminal(self.stream)
    self._lines = lines and not self.terminal
    self._t0 = clock()
    self._first: tuple[int, float] | None = None  # (done, time) after the first unit of this call
    self._bar = None
    if self.terminal:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=self.total, initial=self.start, disable=None, desc=desc, unit=unit,
                       leave=leave)

  def set_fields(self, **fields: Any) -> None:
    """Values shown beside the count (the latest of each): on the bar and on the next line."""
    self.fields.update({k: _format_value(v) for k, v in fields.items()})
    if self._bar is not None:
      self._bar.set_postfix(self.fields, refresh=False)

  def update(self, n: int = 1, **fields: Any) -> None:
    """`n` more units done; `fields` as in `set_fields`. Prints a line when one is due."""
    if fields:
      self.set_fields(**fields)
    before = self.done
    self.done += n
    now = self.clock()
    if self._first is None:
      self._first = (self.done, now)
    if self._bar is not None:
      self._bar.update(n)
    if self._lines and (self.done // self.every > before // self.every
                        or (before < self.total <= self.done)):
      print(self.line(now), file=self.stream, flush=True)

  def rate(self, now: float) -> float | None:
    """Units per second since the first unit of this call (or since it began, if that is all)."""
    if self._first is None:
      return None
    done0, t0 = self._first
    if self.done > done0 and now > t0:
      return (self.done - done0) / (now - t0)
    if self.done > self.start and now > self._t0:
      return (self.done - self.start) / (now - self._t0)
    return None

  def line(self, now: float | None = None) -> str:
    """The plain line of the current position, e.g. `  train step 4/8 (50 %): loss 1.2, ...`."""
    now = self.clock() if now is None else now
    pct = 100 * self.done // self.total if self.total else 100
    parts = [f"{k} {v}" for k, v in self.fields.items()]
    rate = self.rate(now)
    if rate is not None:
      parts.append(f"{rate:.3g} {plural(self.unit)}/s")
    if self.done >= self.total:
      parts.append(f"took {format_duration(now - self._t0)}")
    elif rate:
      parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
    head = f"  {self.desc} {self.unit} {self.done}/{self.total} ({pct} %)"
    return head + (": " + ", ".join(parts) if parts else "")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
