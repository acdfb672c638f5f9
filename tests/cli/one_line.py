"""Checks shared by the bad-input tests of the command lines: the one `error: ...` line, and the
run directory left as it was."""

import hashlib
import os

# absl's log-line format ("W1202 04:14:49.045 ... file.py:123] ..."): orbax's warnings that a
# save took long may appear once training has started; they are not the error line.
_ABSL_WARNING = ("W", "I")


def error_line(stderr: str) -> str:
  """The one line of stderr (absl warning lines aside), which must be an `error: ...` line."""
  lines = [l for l in stderr.splitlines()
           if l.strip() and not (l[:1] in _ABSL_WARNING and l[1:5].isdigit())]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` (links are not followed)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      if os.path.islink(path):
        continue
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_unchanged(before: dict[str, str], workdir, *, except_for=()) -> None:
  after = snapshot(workdir)
  changed = [p for p, h in before.items() if p not in except_for and after.get(p) != h]
  assert not changed, changed
