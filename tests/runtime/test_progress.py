"""runtime/progress.py: a bar on a terminal, plain lines on a schedule in a log."""

from __future__ import annotations

import io

import pytest

from visatb_jax.runtime import progress


class Log(io.StringIO):
  """A file or a pipe: not a terminal; counts flushes."""

  def __init__(self):
    super().__init__()
    self.flushes = 0

  def flush(self):
    self.flushes += 1
    super().flush()


class Terminal(Log):

  def isatty(self):
    return True


class Clock:
  """Seconds that the test sets."""

  def __init__(self, t: float = 0.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


def _lines(stream) -> list[str]:
  return stream.getvalue().splitlines()


def _run(total, *, initial=0, step_s=0.5, first_s=10.0, **kwargs):
  """Every step of a run, the first `first_s` long (it compiles), the others `step_s`."""
  stream, clock = Log(), Clock()
  bar = progress.Progress(total, desc="train", initial=initial, stream=stream, clock=clock,
                          **kwargs)
  for k in range(initial, total):
    clock.t += first_s if k == initial else step_s
    bar.update(1, loss=1.0 + k)
  bar.close()
  return _lines(stream)


@pytest.mark.parametrize("total, every", [(0, 1), (3, 1), (10, 1), (15, 2), (131, 14),
                                          (1000, 100), (3700, 100), (100_000, 100)])
def test_a_line_every_tenth_of_the_run_or_every_100_steps(total, every):
  assert progress.line_every(total) == every


@pytest.mark.parametrize("total, steps", [
    (15, [2, 4, 6, 8, 10, 12, 14, 15]),
    (131, [14, 28, 42, 56, 70, 84, 98, 112, 126, 131]),
    (3, [1, 2, 3]),
])
def test_the_line_schedule(total, steps):
  lines = _run(total)
  assert [int(line.split()[2].split("/")[0]) for line in lines] == steps
  assert all(line.startswith(f"  train step ") and f"/{total} (" in line for line in lines)


def test_a_long_run_prints_a_few_dozen_lines():
  lines = _run(3700)
  assert len(lines) == 37
  assert lines[-1].startswith("  train step 3700/3700 (100 %)")


def test_a_resumed_run_keeps_the_schedule_and_counts_only_its_own_steps():
  lines = _run(131, initial=50)
  assert [int(line.split()[2].split("/")[0]) for line in lines] == [56, 70, 84, 98, 112, 126,
                                                                     131]
  # 6 steps done in this call, 5 of them after the first (compiling) one: 2 steps/s.
  assert lines[0] == "  train step 56/131 (42 %): loss 56, 2 steps/s, ETA 0:38"


def test_the_line_says_step_loss_rate_and_eta():
  stream, clock = Log(), Clock()
  bar = progress.Progress(400, desc="train", stream=stream, clock=clock, max_every=40)
  clock.t = 10.0  # the first step compiles
  bar.update(1, loss=3.0)
  for _ in range(39):
    clock.t += 0.5
    bar.update(1, loss=1.23456)
  # 39 steps in 19.5 s after the first: 2 steps/s; 360 steps left: 3 min.
  assert _lines(stream) == ["  train step 40/400 (10 %): loss 1.235, 2 steps/s, ETA 3:00"]
  assert stream.flushes >= 1  # read while the job runs


def test_the_last_line_says_how_long_the_run_took():
  lines = _run(15, first_s=62.0, step_s=1.0)  # 62 s + 14 s
  assert lines[-1] == "  train step 15/15 (100 %): loss 15, 1 steps/s, took 1:16"


def test_a_step_without_a_loss_shows_the_last_one():
  stream, clock = Log(), Clock()
  bar = progress.Progress(4, desc="train", stream=stream, clock=clock)
  clock.t = 1.0
  bar.update(1, loss=0.25)
  clock.t = 2.0
  bar.update(1)  # the loss of this step is not on the host
  assert _lines(stream)[-1].startswith("  train step 2/4 (50 %): loss 0.25, 1 steps/s")


def test_fields_and_unit_of_an_evaluation():
  stream, clock = Log(), Clock()
  bar = progress.Progress(3, desc="untrained on validation", unit="batch", stream=stream,
                          clock=clock)
  bar.set_fields(task="chat")
  clock.t = 4.0
  bar.update()
  clock.t = 6.0
  bar.update()
  assert _lines(stream)[-1] == ("  untrained on validation batch 2/3 (66 %): task chat, "
                                "0.5 batches/s, ETA 0:02")


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (43, "0:43"), (42.6, "0:43"),
                                           (600, "10:00"), (3599, "59:59"), (3725, "1:02:05"),
                                           (90061, "25:01:01"), (-3, "0:00")])
def test_eta_text(seconds, text):
  assert progress.format_duration(seconds) == text


def test_a_terminal_gets_the_bar_and_no_plain_lines():
  stream, clock = Terminal(), Clock()
  bar = progress.Progress(15, desc="train", stream=stream, clock=clock)
  assert bar.terminal
  for _ in range(15):
    clock.t += 1.0
    bar.update(1, loss=1.0)
  bar.close()
  assert stream.getvalue() == ""


def test_lines_can_be_turned_off():
  assert _run(15, lines=False) == []


def test_a_stream_without_isatty_is_a_log():
  class Bare:
    def __init__(self):
      self.text = []

    def write(self, s):
      self.text.append(s)

    def flush(self):
      pass

  stream, clock = Bare(), Clock()
  with progress.Progress(1, desc="eval", stream=stream, clock=clock) as bar:
    clock.t = 1.0
    bar.update()
  assert "".join(stream.text) == "  eval step 1/1 (100 %): 1 steps/s, took 0:01\n"


def test_the_default_stream_is_stdout_when_made(capsys):
  bar = progress.Progress(2, desc="train", clock=Clock())
  bar.update(2)
  assert capsys.readouterr().out.startswith("  train step 2/2 (100 %)")
