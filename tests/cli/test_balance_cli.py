"""Tests of the `python -m visatb_jax.balance` command line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from visatb_jax.cli import balance
from visatb_jax.core import balancing
from visatb_jax.core import bootstrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "scores_academic_like.json")
EXAMPLE_TASKS = ["vqav2", "gqa", "ocrvqa", "textcaps", "refcoco"]

SCORES = {
    "mini":   {"a": 0.50, "b": 0.40, "c": 0.20},
    "a+mini": {"a": 0.70, "b": 0.45, "c": 0.10},
    "b+mini": {"a": 0.60, "b": 0.60, "c": 0.25},
    "c+mini": {"a": 0.40, "b": 0.40, "c": 0.60},
}


def _write(path, obj) -> str:
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


@pytest.fixture
def scores_file(tmp_path) -> str:
  return _write(tmp_path / "scores.json", SCORES)


def _run(argv, capsys) -> tuple[int, str, str]:
  code = balance.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_table_output(scores_file, capsys):
  # 'chat' has no scores: a fixed task without scores must be listed in --tasks.
  code, out, err = _run([scores_file, "--fixed", "chat=1.5", "--tasks", "a,b,c,chat"], capsys)
  assert code == 0 and err == ""
  lines = out.splitlines()
  assert "form=real" in lines[0] and "T=0.5" in lines[0] and "alpha=(0.25, 0.25, 0.5)" in lines[0]
  header = next(line for line in lines if line.startswith("task"))
  for column in ("C_out", "C_in", "D", "_out", "_in", "_D"):
    assert column in header
  lam = balancing.compute_lambda(SCORES, tasks=["a", "b", "c", "chat"], fixed={"chat": 1.5})
  report = balancing.balance_report(SCORES, tasks=["a", "b", "c", "chat"], fixed={"chat": 1.5})
  start = lines.index(header)
  table = lines[start:lines.index("", start)]  # the task table ends at the first blank line
  assert len(table) == 1 + 4
  rows = {line.split()[0]: line.split() for line in table[1:]}
  for task in ("a", "b", "c"):
    row = rows[task]
    assert len(row) == 8  # task + 7 numbers
    expected = [report["c_out"][task], report["c_in"][task], report["d"][task],
                report["lambda_out"][task], report["lambda_in"][task], report["lambda_d"][task],
                lam[task]]
    assert [float(v) for v in row[1:]] == pytest.approx(expected, abs=6e-5)
  assert rows["chat"][1] == "(fixed)" and float(rows["chat"][-1]) == 1.5
  # Columns are aligned: every row of the task table has the same width as the header.
  assert len({len(line) for line in table}) == 1
  assert "contributions" in out


def test_json_output_matches_compute_lambda(scores_file, capsys):
  code, out, err = _run([scores_file, "--json", "--temperature", "1", "--alpha", "0.5,0.25,0.25"],
                        capsys)
  assert code == 0 and err == ""
  report = json.loads(out)
  expected = balancing.compute_lambda(SCORES, tasks=["a", "b", "c"], temperature=1.0,
                                      alpha=(0.5, 0.25, 0.25))
  assert report["lambda"] == pytest.approx(expected, rel=1e-6)
  assert report["temperature"] == 1.0 and report["alpha"] == [0.5, 0.25, 0.25]
  assert set(report) == {"tasks", "balanced", "form", "temperature", "alpha", "C", "c_out", "c_in",
                         "d", "lambda_out", "lambda_in", "lambda_d", "lambda", "fixed", "groups",
                         "warnings", "at_bound"}
  assert report["warnings"] == []


def test_tasks_option_sets_the_order(scores_file, capsys):
  code, out, _ = _run([scores_file, "--json", "--tasks", "c,a,b"], capsys)
  assert code == 0
  assert json.loads(out)["tasks"] == ["c", "a", "b"]


def test_auto_temperature_and_groups(tmp_path, capsys):
  scores = {"mini": {"a1": 0.4, "a2": 0.6, "b": 0.40, "c": 0.20},
            "A+mini": {"a1": 0.6, "a2": 0.8, "b": 0.45, "c": 0.10},
            "B+mini": {"a1": 0.5, "a2": 0.7, "b": 0.60, "c": 0.25},
            "C+mini": {"a1": 0.3, "a2": 0.5, "b": 0.40, "c": 0.60}}
  groups = {"a1": "A", "a2": "A", "b": "B", "c": "C"}
  argv = [_write(tmp_path / "s.json", scores), "--groups", _write(tmp_path / "g.json", groups),
          "--temperature", "auto"]
  code, out, _ = _run(argv + ["--json"], capsys)
  assert code == 0
  report = json.loads(out)
  assert report["balanced"] == ["A", "B", "C"] and report["groups"] == groups
  expected = balancing.compute_lambda(scores, tasks=list(scores["mini"]), groups=groups,
                                      temperature=report["temperature"])
  assert report["lambda"] == pytest.approx(expected, rel=1e-6)
  assert all(0.5 - 1e-5 <= v <= 2 + 1e-5 for v in report["lambda"].values())
  code, out, _ = _run(argv, capsys)
  assert code == 0 and "group" in out and f"T={report['temperature']:.6g}" in out


@pytest.mark.parametrize("form", ["real", "precise", "base"])
def test_bundled_example(form, capsys):
  code, out, err = _run([EXAMPLE, "--form", form, "--fixed", "sharegpt=1.0", "--json"], capsys)
  assert code == 0 and err == ""
  report = json.loads(out)
  assert report["balanced"] == EXAMPLE_TASKS
  assert report["lambda"]["sharegpt"] == 1.0
  assert sum(report["lambda"][t] for t in EXAMPLE_TASKS) == pytest.approx(5.0, rel=1e-5)


def test_bundled_example_needs_sharegpt_fixed(capsys):
  code, _, err = _run([EXAMPLE], capsys)
  assert code == 2
  assert "missing model 'sharegpt+mini'" in err and "fixed weight" in err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
  assert code == 2
  assert err.endswith("\n") and err.count("\n") == 1, err
  assert err.startswith("error: ")
  assert "Traceback" not in err
  for needle in needles:
    assert needle in err, (needle, err)


@pytest.mark.parametrize("content, needles", [
    (None, ["no such file"]),
    ("{not json", ["invalid JSON", "line 1"]),
    ("[1, 2]", ["expected a non-empty object"]),
    ("{}", ["expected a non-empty object"]),
    (json.dumps({"mini": [0.5]}), ["model 'mini' must map task -> score"]),
    (json.dumps({k: v for k, v in SCORES.items() if k != "b+mini"}), ["missing model 'b+mini'"]),
    (json.dumps({**SCORES, "a+mini": {"a": 0.7, "b": 0.45}}),
     ["model 'a+mini' has no score for task 'c'"]),
    (json.dumps({**SCORES, "b+mini": {"a": 0.6, "b": 0.35, "c": 0.25}}),
     ["task 'b' did not improve with its own data", "V_b(b+mini)=0.35 <= V_b(mini)=0.4"]),
    (json.dumps({**SCORES, "mini": {"a": 0.5, "b": "x", "c": 0.2}}),
     ["model 'mini' on task 'b' is not a number"]),
    ('{"mini": {"a": NaN, "b": 0.4, "c": 0.2}, "a+mini": {"a": 0.7, "b": 0.45, "c": 0.1}, '
     '"b+mini": {"a": 0.6, "b": 0.6, "c": 0.25}, "c+mini": {"a": 0.4, "b": 0.4, "c": 0.6}}',
     ["model 'mini' on task 'a' is not finite"]),
])
def test_bad_scores_file(tmp_path, capsys, content, needles):
  path = str(tmp_path / "scores.json")
  if content is not None:
    _write(tmp_path / "scores.json", content)
  code, out, err = _run([path], capsys)
  assert out == ""
  _assert_one_line_error(code, err, f"error: {path}: ", *needles)


@pytest.mark.parametrize("argv, needles", [
    (["--alpha", "1,2,3"], ["--alpha", "sum to 1"]),
    (["--alpha", "a,b"], ["--alpha", "three comma-separated numbers"]),
    (["--temperature", "hot"], ["--temperature", "'hot'"]),
    (["--temperature", "-2"], ["--temperature", "> 0"]),
    (["--fixed", "chat"], ["--fixed", "TASK=WEIGHT", "'chat'"]),
    (["--fixed", "chat=-1"], ["--fixed", ">= 0"]),
    (["--form", "fancy"], ["--form", "fancy"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--tasks", "a"], ["scores.json", "at least 2 balanced tasks"]),
    (["--tasks", ","], ["--tasks"]),
    (["--on-degenerate", "ignore"], ["--on-degenerate", "'ignore'"]),
])
def test_bad_options(scores_file, capsys, argv, needles):
  code, out, err = _run([scores_file] + argv, capsys)
  assert out == ""
  _assert_one_line_error(code, err, *needles)


def test_on_degenerate_warn(tmp_path, capsys):
  # Task b did not improve with its own data (0.35 < 0.4): an error by default; with
  # --on-degenerate warn its column of C is zeroed, and one warning line goes to stderr.
  bad = _write(tmp_path / "scores.json",
               {**SCORES, "b+mini": {"a": 0.6, "b": 0.35, "c": 0.25}})
  code, out, err = _run([bad, "--json"], capsys)
  _assert_one_line_error(code, err, "task 'b' did not improve")
  code, out, err = _run([bad, "--json", "--on-degenerate", "warn"], capsys)
  assert code == 0
  assert err == (f"warning: {bad}: task 'b' did not improve with its own data: "
                 "V_b(b+mini)=0.35 <= V_b(mini)=0.4; C[i→b] set to 0 for every other i "
                 "(on_degenerate='warn')\n")
  report = json.loads(out)
  assert [row[1] for row in report["C"]] == [0.0, 1.0, 0.0]
  assert len(report["warnings"]) == 1 and report["warnings"][0] in err
  scores = json.loads(open(bad, encoding="utf-8").read())
  with pytest.warns(UserWarning):
    expected = balancing.compute_lambda(scores, tasks=["a", "b", "c"], on_degenerate="warn")
  assert report["lambda"] == pytest.approx(expected, rel=1e-6)
  code, out, err = _run([bad, "--on-degenerate", "warn"], capsys)  # table output
  assert code == 0 and "contributions" in out and err.count("\n") == 1
  assert err.startswith("warning: ")


@pytest.mark.parametrize("content, needles", [
    ("[]", ["expected an object {task: group}"]),
    (json.dumps({"a": "A", "b": 3, "c": "C"}), ["group of task 'b' must be a string"]),
    (json.dumps({"a": "A", "b": "B"}), ["tasks ['c'] have no group"]),
    ("{oops", ["invalid JSON"]),
])
def test_bad_groups_file(tmp_path, scores_file, capsys, content, needles):
  groups = _write(tmp_path / "groups.json", content)
  code, _, err = _run([scores_file, "--groups", groups], capsys)
  _assert_one_line_error(code, err, f"{groups}: ", *needles)


def test_module_entry_point_subprocess(tmp_path):
  bad = _write(tmp_path / "scores.json", {k: v for k, v in SCORES.items() if k != "c+mini"})
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "visatb_jax.balance", bad], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith(f"error: {bad}: missing model 'c+mini'")


def _subprocess_env() -> dict:
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_fixed_task_that_no_score_names(scores_file, capsys):
  code, out, err = _run([scores_file, "--fixed", "zzz=1.0"], capsys)
  assert out == ""
  _assert_one_line_error(code, err, "error: --fixed: 'zzz'", "no model in", "--tasks")
  code, out, err = _run([scores_file, "--fixed", "zzz=1.0", "yyy=2", "chat=1"], capsys)
  _assert_one_line_error(code, err, "'zzz', 'yyy'", "these tasks")
  # Listed in --tasks, it is deliberate: a task weighted without scores.
  code, out, _ = _run([scores_file, "--fixed", "zzz=1.0", "--tasks", "a,b,c,zzz", "--json"],
                      capsys)
  assert code == 0 and json.loads(out)["lambda"]["zzz"] == 1.0


def test_broken_pipe_exits_quietly(scores_file):
  # `... --json | head -c 10`: the reader is gone before the command writes anything.
  proc = subprocess.Popen([sys.executable, "-m", "visatb_jax.balance", scores_file, "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                          env=_subprocess_env())
  proc.stdout.close()
  err = proc.stderr.read().decode()
  proc.stderr.close()
  assert proc.wait(timeout=120) == balance.EXIT_BROKEN_PIPE
  assert err == ""


# ----------------------------------------------------------------------------------------------
# Per-sample input (--samples): bootstrap intervals.

N_SAMPLES = {"a": 12, "b": 9, "c": 15}


def _per_sample_lists(scores: dict, seed: int = 0, noise: float = 0.05) -> dict:
  """{model: {task: [scores]}} whose means are `scores`, paired by a shared per-sample effect."""
  rng = np.random.default_rng(seed)
  common = {t: rng.normal(0.0, noise, n) for t, n in N_SAMPLES.items()}
  out = {}
  for model, row in scores.items():
    out[model] = {}
    for task, value in row.items():
      e = common[task] + rng.normal(0.0, noise / 3, N_SAMPLES[task])
      out[model][task] = [float(v) for v in value + e - e.mean()]
  return out


def _ids(task: str) -> list[str]:
  # Sorted as strings, "s10" < "s2": the CLI must pair by sorted id, whatever the file order.
  return [f"{task}-s{k}" for k in range(N_SAMPLES[task])]


def _per_sample_file(path, lists: dict, shuffle_seed: int = 0) -> str:
  """Writes {model: {task: {sample_id: score}}}, each model's ids in its own shuffled order."""
  rnd = random.Random(shuffle_seed)
  data = {}
  for model, row in lists.items():
    data[model] = {}
    for task, values in row.items():
      pairs = list(zip(sorted(_ids(task)), values))
      rnd.shuffle(pairs)
      data[model][task] = dict(pairs)
  return _write(path, data)


@pytest.fixture
def samples_file(tmp_path) -> tuple[str, dict]:
  lists = _per_sample_lists(SCORES)
  return _per_sample_file(tmp_path / "samples.json", lists), lists


def test_samples_json_matches_bootstrap_report(samples_file, capsys):
  path, lists = samples_file
  argv = ["--samples", path, "--json", "--resamples", "60", "--seed", "4", "--level", "0.8",
          "--temperature", "auto", "--fixed", "chat=1.5", "--tasks", "a,b,c,chat"]
  code, out, err = _run(argv, capsys)
  assert code == 0 and err == ""
  report = json.loads(out)
  expected = bootstrap.bootstrap_report(lists, tasks=["a", "b", "c", "chat"], temperature="auto",
                                        fixed={"chat": 1.5}, resamples=60, seed=4, level=0.8)
  assert report == expected
  assert report["bootstrap"]["samples"] == N_SAMPLES and report["noisy"] == []


def test_samples_table(samples_file, capsys):
  path, lists = samples_file
  code, out, err = _run(["--samples", path, "--resamples", "50", "--wide"], capsys)
  assert code == 0 and err == ""
  report = bootstrap.bootstrap_report(lists, tasks=["a", "b", "c"], resamples=50)
  lines = out.splitlines()
  assert "form=real" in lines[0] and "T=0.5" in lines[0]
  assert "50 resamples" in lines[1] and "seed 0" in lines[1] and "0.9" in lines[2]
  header = next(line for line in lines if line.startswith("task"))
  assert header.split()[1:3] == ["gain", "C_out"]
  start = lines.index(header)
  table = lines[start:lines.index("", start)]
  for line in table[1:]:
    task = line.split()[0]
    values = [float(v.strip("[],")) for v in line.split()[1:]]
    assert len(values) == 8 * 3  # gain, C_out, C_in, D, λ_out, λ_in, λ_D, λ: value [lo, hi]
    keys = ("gain", "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d", "lambda")
    expected = []
    for key in keys:
      expected += [report[key][task]] + report["intervals"][key][task]
    assert values == pytest.approx(expected, abs=6e-5)
  assert "contributions" in out and "1.0000 [1.0000, 1.0000]" in out


def test_samples_noisy_units_are_warned(tmp_path, capsys):
  # b barely improves with its own data: its gain interval contains 0.
  noisy = {**SCORES, "b+mini": {"a": 0.6, "b": 0.401, "c": 0.25}}
  path = _per_sample_file(tmp_path / "s.json", _per_sample_lists(noisy, noise=0.1))
  code, out, err = _run(["--samples", path, "--resamples", "200", "--json"], capsys)
  assert code == 0
  report = json.loads(out)
  assert report["noisy"] == ["b"]
  lo, hi = report["intervals"]["gain"]["b"]
  assert err == (f"warning: {path}: task 'b': own-data gain V_b(b+mini) - V_b(mini) = "
                 f"{report['gain']['b']:.4f} [{lo:.4f}, {hi:.4f}] contains 0 (level 0.9): its "
                 "column of C is noise; --drop b leaves it out of C_out and C_in\n")
  code, out, err = _run(["--samples", path, "--resamples", "200", "--json", "--drop", "b"],
                        capsys)
  assert code == 0 and err == ""
  report = json.loads(out)
  assert report["bootstrap"]["drop"] == ["b"] and report["c_in"]["b"] == 0.0
  code, out, err = _run(["--samples", path, "--resamples", "200", "--drop", "b"], capsys)
  assert code == 0 and "drop=b" in out.splitlines()[0]


def test_drop_with_scores_file(scores_file, capsys):
  code, out, _ = _run([scores_file, "--json", "--drop", "b"], capsys)
  assert code == 0
  expected = balancing.balance_report(SCORES, tasks=["a", "b", "c"], drop=["b"])
  assert json.loads(out) == expected


def _bad_samples(lists: dict, model: str, task: str, value) -> dict:
  data = {m: {t: dict(zip(_ids(t), v)) for t, v in row.items()} for m, row in lists.items()}
  data[model][task] = value
  return data


_LISTS = _per_sample_lists(SCORES)
_B_IDS = _ids("b")


@pytest.mark.parametrize("content, needles", [
    (None, ["no such file"]),
    ("[]", ["expected a non-empty object {model: {task: {sample_id: score}}}"]),
    (json.dumps({"mini": [1]}), ["model 'mini' must map task -> {sample_id: score}"]),
    (json.dumps(_bad_samples(_LISTS, "mini", "a", [0.5])),
     ["model 'mini', task 'a': expected a non-empty object {sample_id: score}"]),
    (json.dumps(_bad_samples(_LISTS, "mini", "a", {})), ["model 'mini', task 'a'"]),
    (json.dumps(_bad_samples(_LISTS, "b+mini", "b", {**dict(zip(_B_IDS[1:], _LISTS["b+mini"]["b"])),
                                                     "b-s99": 0.5})),
     ["models 'mini' and 'b+mini' disagree on the sample ids of task 'b'",
      "1 only in 'mini' ('b-s0')", "1 only in 'b+mini' ('b-s99')"]),
    (json.dumps(_bad_samples(_LISTS, "c+mini", "b", dict(zip(_B_IDS[:-2],
                                                             _LISTS["c+mini"]["b"])))),
     ["disagree on the sample ids of task 'b'", "2 only in 'mini'"]),
    (json.dumps(_bad_samples(_LISTS, "a+mini", "c", {**dict(zip(_ids("c"), _LISTS["a+mini"]["c"])),
                                                     "c-s1": "x"})),
     ["model 'a+mini', task 'c', sample 'c-s1': score is not a number: 'x'"]),
    (json.dumps(_bad_samples(_LISTS, "a+mini", "b", {**dict(zip(_B_IDS, _LISTS["a+mini"]["b"])),
                                                     "b-s3": float("nan")})),
     ["model 'a+mini', task 'b', sample 'b-s3': score is not finite: nan"]),
])
def test_bad_samples_file(tmp_path, capsys, content, needles):
  path = str(tmp_path / "samples.json")
  if content is not None:
    _write(tmp_path / "samples.json", content)
  code, out, err = _run(["--samples", path], capsys)
  assert out == ""
  _assert_one_line_error(code, err, f"error: {path}: ", *needles)


def test_missing_model_in_samples_file(tmp_path, capsys):
  lists = {m: r for m, r in _LISTS.items() if m != "c+mini"}
  path = _per_sample_file(tmp_path / "s.json", lists)
  code, out, err = _run(["--samples", path], capsys)
  _assert_one_line_error(code, err, f"error: {path}: missing model 'c+mini'")


@pytest.mark.parametrize("argv, needles", [
    ([], ["expected SCORES.json or --samples PER_SAMPLE.json"]),
    (["SCORES", "--samples", "S"], ["either SCORES.json or --samples", "not both"]),
    (["SCORES", "--resamples", "10"], ["--resamples: only with --samples"]),
    (["SCORES", "--level", "0.5"], ["--level: only with --samples"]),
    (["--samples", "S", "--resamples", "0"], ["--resamples: expected an integer >= 1"]),
    (["--samples", "S", "--resamples", "x"], ["--resamples", "'x'"]),
    (["--samples", "S", "--seed", "-1"], ["--seed: expected an integer >= 0"]),
    (["--samples", "S", "--level", "1"], ["--level: expected a number in (0, 1)"]),
    (["SCORES", "--shrinkage", "evidence"], ["--shrinkage: only with --samples"]),
    (["--samples", "S", "--shrinkage", "lots"], ["--shrinkage", "'lots'"]),
    (["--samples", "S", "--shrinkage", "evidence", "--resamples", "1"],
     ["--shrinkage: evidence needs --resamples >= 2"]),
])
def test_bad_samples_options(tmp_path, samples_file, scores_file, capsys, argv, needles):
  path, _ = samples_file
  argv = [{"SCORES": scores_file, "S": path}.get(a, a) for a in argv]
  code, out, err = _run(argv, capsys)
  assert out == ""
  _assert_one_line_error(code, err, *needles)


def test_drop_unknown_unit(scores_file, capsys):
  code, _, err = _run([scores_file, "--drop", "b", "x"], capsys)
  _assert_one_line_error(code, err, "error: --drop: 'x' not among the balanced tasks")


# ----------------------------------------------------------------------------------------------
# Preparation replicates (several --samples files, or replicate lists) and --shrinkage.


def _replicate_lists(replicates: int) -> list[dict]:
  """One {model: {task: [scores]}} per replicate: the same samples, different training noise."""
  return [_per_sample_lists({m: {t: v + 0.02 * r * (m == "a+mini") for t, v in row.items()}
                             for m, row in SCORES.items()}, seed=r)
          for r in range(replicates)]


def _stacked(reps: list[dict]) -> dict:
  return {m: {t: [rep[m][t] for rep in reps] for t in row} for m, row in reps[0].items()}


@pytest.fixture
def replicate_files(tmp_path) -> tuple[list[str], dict]:
  reps = _replicate_lists(3)
  paths = [_per_sample_file(tmp_path / f"r{k}.json", rep, shuffle_seed=k)
           for k, rep in enumerate(reps)]
  return paths, _stacked(reps)


def test_replicate_files_json(replicate_files, tmp_path, capsys):
  paths, stacked = replicate_files
  argv = ["--json", "--resamples", "40", "--seed", "2"]
  code, out, err = _run(["--samples", *paths] + argv, capsys)
  assert code == 0 and err == ""
  report = json.loads(out)
  assert report == bootstrap.bootstrap_report(stacked, tasks=["a", "b", "c"], resamples=40,
                                              seed=2)
  assert report["bootstrap"]["replicates"] == 3
  assert set(report["variance"]) == {"training_share", "training_var", "sampling_var"}
  # The same replicates as lists in one file: the same report.
  one = {m: {t: {i: [rep[k] for rep in values] for k, i in enumerate(sorted(_ids(t)))}
             for t, values in row.items()} for m, row in stacked.items()}
  code, out, err = _run(["--samples", _write(tmp_path / "all.json", one)] + argv, capsys)
  assert code == 0 and err == "" and json.loads(out) == report


def test_replicate_files_table(replicate_files, capsys):
  paths, stacked = replicate_files
  code, out, err = _run(["--samples", *paths, "--resamples", "40"], capsys)
  assert code == 0 and err == ""
  report = bootstrap.bootstrap_report(stacked, tasks=["a", "b", "c"], resamples=40)
  lines = out.splitlines()
  assert "two-level paired bootstrap (3 replicates, then samples)" in lines[1]
  header = next(line for line in lines if line.startswith("task"))
  assert header.split()[1:] == ["λ", "[lo,", "hi]", "train", "gain", "C_out", "C_in", "D"]
  start = lines.index(header)
  for line in lines[start + 1:lines.index("", start)]:
    task, share = line.split()[0], line.split()[4]
    assert share == f"{100 * report['variance']['training_share']['lambda'][task]:.0f}%"


def test_replicate_files_that_disagree(tmp_path, capsys):
  reps = _replicate_lists(2)
  good = _per_sample_file(tmp_path / "r0.json", reps[0])
  bad = dict(reps[1])
  bad.pop("c+mini")
  other = _per_sample_file(tmp_path / "r1.json", bad)
  code, out, err = _run(["--samples", good, other], capsys)
  assert out == ""
  _assert_one_line_error(code, err, f"error: {good}, {other}: ",
                         f"file 0 ({good}) and file 1 ({other}) disagree on the models",
                         "1 only in file 0", "'c+mini'")
  # Replicate lists of different lengths in one file.
  data = {m: {t: {i: [v, v] for i, v in zip(sorted(_ids(t)), vals)} for t, vals in row.items()}
          for m, row in reps[0].items()}
  data["b+mini"]["c"]["c-s3"] = [0.5]
  path = _write(tmp_path / "ragged.json", data)
  code, out, err = _run(["--samples", path], capsys)
  _assert_one_line_error(code, err, f"error: {path}: ", "model 'b+mini', task 'c', sample 'c-s3' "
                         "has 1 replicate scores")
  data["b+mini"]["c"]["c-s3"] = [0.5, "x"]
  code, out, err = _run(["--samples", _write(tmp_path / "ragged.json", data)], capsys)
  _assert_one_line_error(code, err, "sample 'c-s3': score is not a number: 'x'")


def test_shrinkage_option(samples_file, capsys):
  path, lists = samples_file
  argv = ["--samples", path, "--resamples", "50", "--shrinkage", "evidence"]
  code, out, err = _run(argv + ["--json"], capsys)
  assert code == 0 and err == ""
  report = json.loads(out)
  assert report == bootstrap.bootstrap_report(lists, tasks=["a", "b", "c"], resamples=50,
                                              shrinkage="evidence")
  assert report["shrinkage"]["rule"] == "evidence"
  code, out, err = _run(argv, capsys)
  assert code == 0 and err == ""
  assert "shrinkage=evidence" in out.splitlines()[0]
  assert "evidence shrinkage toward the mean over units" in out
  factor = report["shrinkage"]["factor"]["d"]["a"]
  row = next(line for line in out.splitlines() if line.startswith("a ") and "(z=" in line)
  assert f"{factor:.2f} (z=" in row
  # The default is the paper's λ.
  code, out, _ = _run(["--samples", path, "--resamples", "50", "--json"], capsys)
  assert json.loads(out)["bootstrap"]["shrinkage"] == "none" and "shrinkage" not in json.loads(out)


def test_auto_temperature_at_bound_is_warned_with_the_table(tmp_path, capsys):
  # Two tasks: the lowest feasible T puts one of them on a bound of [0.5, 2].
  scores = {"mini": {"a": 0.5, "b": 0.5}, "a+mini": {"a": 0.7, "b": 0.55},
            "b+mini": {"a": 0.55, "b": 0.8}}
  path = _write(tmp_path / "s.json", scores)
  code, out, err = _run([path, "--temperature", "auto"], capsys)
  assert code == 0 and err.count("\n") == 1
  assert err.startswith(f"warning: {path}: temperature='auto' chose T=")
  assert "task 'a' (0.5)" in err and "shrinkage='evidence'" in err
  code, out, err = _run([path, "--temperature", "auto", "--json"], capsys)
  report = json.loads(out)
  assert code == 0 and err == "" and report["at_bound"] == ["a"] and len(report["warnings"]) == 1


def test_help_documents_replicates_and_shrinkage():
  text = balance._parser().format_help()
  assert "--shrinkage {none,evidence}" in text and "replicates" in text
  assert "--samples PER_SAMPLE.json ..." in text


def test_the_cli_reads_its_choices_from_core_without_importing_jax():
  """One list of choices (core/options.py) for the CLI, the config and the λ functions; reading
  it for --help must not import jax."""
  import subprocess
  import sys
  code = ("import sys; import visatb_jax.cli.balance as b; from visatb_jax.core import options; "
          "assert (b.SHRINKAGE, b.FORMS, b.ON_DEGENERATE) == (options.SHRINKAGE, options.FORMS, "
          "options.ON_DEGENERATE); print('jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
  from visatb_jax.core import bootstrap
  assert bootstrap.SHRINKAGE is balance.SHRINKAGE


# ----------------------------------------------------------------------------------------------
# The table's width: the default fits 100 columns, --wide has every column.

WIDTH = 100
FOUR = {"caption": 0.50, "count": 0.40, "background": 0.20, "grounding": 0.30}


def _four_task_replicates(tmp_path, replicates: int = 2) -> list[str]:
  """Per-sample files of four balanced tasks, one per replicate, sample ids `s0`, `s1`, ..."""
  rng = np.random.default_rng(7)
  models = {"mini": {}} | {f"{t}+mini": {t: 0.25} | {u: 0.03 for u in FOUR if u != t}
                           for t in FOUR}
  paths = []
  for r in range(replicates):
    data = {}
    for model, gains in models.items():
      data[model] = {}
      for task, base in FOUR.items():
        scores = base + gains.get(task, 0.0) + rng.normal(0.0, 0.08, 30) + 0.01 * r
        data[model][task] = {f"s{k}": float(v) for k, v in enumerate(scores)}
    paths.append(_write(tmp_path / f"rep{r}.json", data))
  return paths


def test_default_table_fits_100_columns_and_wide_has_every_column(tmp_path, capsys):
  paths = _four_task_replicates(tmp_path)
  argv = ["--samples", *paths, "--resamples", "50", "--temperature", "auto",
          "--shrinkage", "evidence", "--fixed", "sharegpt=1.0", "--tasks",
          ",".join([*FOUR, "sharegpt"])]
  code, out, _ = _run(argv, capsys)
  assert code == 0
  lines = out.splitlines()
  assert max(len(line) for line in lines) <= WIDTH, max(lines, key=len)
  header = next(line for line in lines if line.startswith("task"))
  start = lines.index(header)
  rows = {line.split()[0]: line for line in lines[start + 1:lines.index("", start)]}
  assert set(rows) == set(FOUR) | {"sharegpt"}
  report = json.loads(_run(argv + ["--json"], capsys)[1])
  for task in FOUR:  # λ with its interval, then its training share and the plain inputs
    lam, (lo, hi) = report["lambda"][task], report["intervals"]["lambda"][task]
    assert f"{lam:.4f} [{lo:.4f}, {hi:.4f}]" in rows[task]
    cells = rows[task].split("]")[1].split()
    share = report["variance"]["training_share"]["lambda"][task]
    assert cells[0] == ("-" if share is None else f"{100 * share:.0f}%")
    assert [float(c) for c in cells[1:]] == pytest.approx(
        [report[k][task] for k in ("gain", "c_out", "c_in", "d")], abs=6e-5)
  for column in ("λ_out", "λ_in", "λ_D"):
    assert column not in header
  assert "--wide" in lines[-1]
  # --wide: every component with its interval, as wide as it takes.
  code, wide, _ = _run(argv + ["--wide"], capsys)
  assert code == 0
  wide_lines = wide.splitlines()
  wide_header = next(line for line in wide_lines if line.startswith("task"))
  assert wide_header.split()[1:] == ["gain", "C_out", "C_in", "D", "λ_out", "λ_in", "λ_D", "λ",
                                     "train"]
  assert max(len(line) for line in wide_lines) > WIDTH
  lam_d, (lo, hi) = report["lambda_d"]["count"], report["intervals"]["lambda_d"]["count"]
  assert f"{lam_d:.4f} [{lo:.4f}, {hi:.4f}]" in wide


def test_wide_is_accepted_with_run_and_changes_nothing_for_a_scores_file(scores_file, capsys):
  code, narrow, _ = _run([scores_file], capsys)
  assert code == 0 and _run([scores_file, "--wide"], capsys)[1] == narrow
  # --run refuses options that would change the numbers, not the table's width.
  code, _, err = _run(["--run", "nowhere", "--wide"], capsys)
  assert code == 2 and "--wide" not in err and "nowhere" in err
