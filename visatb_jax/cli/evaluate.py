"""Command line: score a saved model on any scored or zero-shot task of a config.

  python -m visatb_jax.evaluate --config C --model DIR [--tasks a,b] [--split test]
      [--out FILE] [--config.field=value ...]

DIR is either

* a run's model directory (`final/<method>`, `final/stl/<task>`, `prep/<name>`, `pretrain`:
  orbax checkpoints and a finished run.json). It is rebuilt as the pipeline builds it, from the
  run directory's own tokenizer and generated benchmark; the config must be the run's (its
  `model` and `pretrain` sections are checked against the run's config.json);
* or a Hugging Face LLaVA or Qwen2-VL directory (config.json, safetensors and its tokenizer),
  for a config with a `llava_json` source (for Qwen2-VL, the `qwen2vl` template).

The tasks are the config's scored tasks and its zero-shot tasks (`config.zero_shot`,
docs/method.md §12), all of them by default. References follow the pipeline's convention (a
sample's `"answers"`, else its last assistant turn). The command prints a table and writes

  {"model", "kind": "run" | "hf", "split", "scores": {task: mean},
   "tasks": {task: {"metric", "zero_shot", "samples": n}}, "samples": {task: {id: score}},
   "predictions": {task: {id: answer}}}

to FILE (default DIR/eval_<split>.json). Every problem ends the command with one line
`error: ...` on stderr and exit code 2, as `python -m visatb_jax.launch`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from visatb_jax.pipeline.errors import PipelineError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
SPLITS = ("val", "test")
RUN_INFO = "run.json"
HF_CONFIG = "config.json"
# What marks the top of a run directory (pipeline/run_dir.py); config.json would also match a
# Hugging Face directory.
RUN_MANIFEST = "manifest.json"


class UsageError(Exception):
  """A problem with the command line's own inputs; printed as one line."""


def _error(message: Any) -> None:
  """Prints `message` as the one line `error: ...` on stderr."""
  text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f"error: {text}", file=sys.stderr, flush=True)


def _innermost(error: BaseException) -> str:
  """ml_collections wraps an unknown override as AttributeError(KeyError("'field'\\n...")): the
  innermost message, first line."""
  text: Any = error
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]
  return str(text).partition("\n")[0].strip()


def _flags(argv: Sequence[str]) -> tuple[flags.FlagValues, dict[str, Any]]:
  """Flags of their own (not absl's global FLAGS), so that main() can run more than once.

  Each help is one short line: `--help` lists the flags one line each (_help_text).
  """
  fv = flags.FlagValues()
  holders = {
      "config": config_flags.DEFINE_config_file(
          "config", None, "the run's config file: a path, or a name in configs/, as for launch",
          flag_values=fv, lock_config=True, sys_argv=list(argv)),
      "model": flags.DEFINE_string(
          "model", None, "a run's model directory, or a Hugging Face LLaVA/Qwen2-VL directory",
          flag_values=fv),
      "tasks": flags.DEFINE_list(
          "tasks", [], "tasks to score, comma separated (default every scored and zero-shot)",
          flag_values=fv),
      "split": flags.DEFINE_enum("split", "test", SPLITS, "the split to score", flag_values=fv),
      "out": flags.DEFINE_string("out", None, "output JSON (default DIR/eval_<split>.json)",
                                 flag_values=fv),
  }
  return fv, holders


# The listing's VALUE names; every flag of _flags is listed (tests/cli/test_help.py).
_METAVARS = {"config": "FILE", "model": "DIR", "tasks": "A,B", "split": "", "out": "FILE"}


def _help_text() -> str:
  """The docstring and the command's flags, one line each.

  evaluate takes no flag but its own (not absl's logging flags, as launch does), so there is no
  separate --helpfull: it is accepted and prints the same.
  """
  from visatb_jax import cli  # pylint: disable=g-import-not-at-top
  fv, _ = _flags([])
  rows = cli.absl_option_rows(fv, _METAVARS)
  rows.insert(1, ("--config.FIELD=VALUE", "set any field of the config, e.g. "
                                          "--config.data.root=/data"))
  rows.append(("-h, --help", "show this help and exit"))
  return f"{__doc__.strip()}\n\noptions:\n{cli.option_lines(rows)}"


# ------------------------------------------------------------------------------------- models


def model_kind(model_dir: str) -> str:
  """"run" (a pipeline's model directory) or "hf" (a Hugging Face checkpoint directory)."""
  if not os.path.isdir(model_dir):
    raise UsageError(f"model directory {model_dir} does not exist")
  if os.path.isfile(os.path.join(model_dir, RUN_INFO)):
    return "run"
  if os.path.isfile(os.path.join(model_dir, HF_CONFIG)):
    return "hf"
  raise UsageError(f"{model_dir} is neither a run's model directory (no {RUN_INFO}) nor a "
                   f"Hugging Face checkpoint (no {HF_CONFIG})")


def run_directory(model_dir: str) -> str:
  """The run directory holding a run's model directory (the nearest parent with a manifest)."""
  parent = os.path.dirname(model_dir)
  while parent and parent != os.path.dirname(parent):
    if os.path.isfile(os.path.join(parent, RUN_MANIFEST)):
      return parent
    parent = os.path.dirname(parent)
  raise UsageError(f"{model_dir} has a {RUN_INFO} but no run directory (with {RUN_MANIFEST}) "
                   "holds it; its tokenizer and data cannot be found")


def _as_json(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def check_same_model(run_config, workdir: str) -> None:
  """The config must build the run's model: its `model` and `pretrain` sections are the run's."""
  from visatb_jax.runtime import fileio  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return  # a run stopped before its first stage: nothing to compare with
  recorded = fileio.read_json(path)  # a damaged file: its error names it
  if not isinstance(recorded, dict):
    raise UsageError(f"{path} holds a JSON {type(recorded).__name__}, not the run's config: it "
                     "is damaged; run the pipeline on this run directory again to rewrite it")
  for section in ("model", "pretrain"):
    ours, theirs = _as_json(run_config.sections.get(section)), recorded.get(section)
    if ours != theirs:
      raise UsageError(f"config.{section} differs from the one the run in {workdir} was trained "
                       f"with ({path}); pass the run's config and overrides")


# -------------------------------------------------------------------------------------- tasks


def select_tasks(run_config, requested: Sequence[str]) -> list[str]:
  """The tasks to score, in config order (scored tasks, then zero-shot ones) unless named."""
  scored = list(run_config.tasks.eval_tasks)
  zero = list(run_config.zero_shot)
  if not requested:
    return scored + zero
  known = scored + zero
  for task in requested:
    if task not in known:
      raise UsageError(f"unknown task {task!r} in --tasks; the config scores {scored}"
                       + (f" and zero-shot {zero}" if zero else ""))
  return list(dict.fromkeys(requested))


def _workspace(run_config, model_dir: str, kind: str, scratch: str):
  """(workspace, rel_dir) to load the model from; `scratch` holds an HF model's tokenizer."""
  from visatb_jax.data import template  # pylint: disable=g-import-not-at-top
  from visatb_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline.workspace import Workspace  # pylint: disable=g-import-not-at-top
  if kind == "run":
    workdir = run_directory(model_dir)
    check_same_model(run_config, workdir)
    return Workspace(run_config, workdir), os.path.relpath(model_dir, workdir)
  data = run_config.sections["data"]
  if data.get("source") != "llava_json":
    raise UsageError("a Hugging Face directory can be scored with a llava_json config only: the "
                     "built-in benchmark and its tokenizer live in a run directory, so pass a "
                     "run's model directory (e.g. runs/demo/final/visatb)")
  # The model is the directory itself, whatever config.model.path names.
  sections = {**run_config.sections, "model": {**run_config.sections["model"], "path": model_dir}}
  ws = Workspace(dataclasses.replace(run_config, sections=sections), scratch)
  try:
    tokenizer_lib.copy_pretrained_tokenizer(
        data.get("tokenizer") or model_dir, ws.data.tokenizer_dir,
        image_token=template.get_template(ws.data.template).image_token)
  except ValueError as e:
    raise PipelineError(str(e)) from e
  return ws, None


def evaluate_model(config: Any, model_dir: str, *, tasks: Sequence[str] = (),
                   split: str = "test") -> dict[str, Any]:
  """Scores the model in `model_dir` on `tasks` of `split`; the JSON document described above.

  Raises:
    UsageError, PipelineError (ConfigError), ValueError (an image, a checkpoint), OSError.
  """
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  kind = model_kind(model_dir)
  if split not in SPLITS:
    raise UsageError(f"--split={split!r}; choose one of {list(SPLITS)}")
  import jax  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline import evaluation  # pylint: disable=g-import-not-at-top
  run_config = config_lib.build(config, num_devices=jax.device_count())
  names = select_tasks(run_config, tasks)
  scratch = tempfile.mkdtemp(prefix="visatb_evaluate_")
  try:
    ws, rel_dir = _workspace(run_config, model_dir, kind, scratch)
    if rel_dir is not None:
      ws.dir.run_info(rel_dir)  # a model whose training has not finished: one line
      model = ws.models.load(rel_dir)
    else:
      model = ws.models.new_model(from_base=False)
    zero = [t for t in names if t in run_config.zero_shot]
    scored = [t for t in names if t not in run_config.zero_shot]
    sets = {}
    if scored:
      sets.update(ws.data.eval_sets(split, tuple(scored)))
    if zero:
      sets.update(ws.data.zero_shot_eval_sets(split, tuple(zero)))
    ev = run_config.sections["eval"]
    result = evaluation.evaluate_samples(
        model, sets, tokenizer=ws.data.tokenizer, batch_size=int(ev["batch_size"]),
        max_new_tokens=int(ev["max_new_tokens"]), tasks=names, desc=f"{split}",
        mesh=ws.models.mesh,
        task_max_new_tokens=evaluation.task_budgets(ev, run_config.sections["zero_shot"]))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return {
      "model": model_dir, "kind": kind, "split": split, "scores": result.scores,
      "tasks": {t: {"metric": sets[t].metric, "zero_shot": t in run_config.zero_shot,
                    "samples": len(sets[t])} for t in names},
      "samples": result.samples,
      "predictions": {t: dict(zip(sets[t].ids, result.predictions[t])) for t in names},
  }


def format_table(result: Mapping[str, Any]) -> str:
  """The scores as an aligned text table; zero-shot tasks are starred."""
  rows = [("task", "metric", "n", "score")]
  for task, info in result["tasks"].items():
    rows.append((task + ("*" if info["zero_shot"] else ""), info["metric"], str(info["samples"]),
                 f"{result['scores'][task]:.4f}"))
  widths = [max(len(r[k]) for r in rows) for k in range(4)]
  lines = [f"{result['model']} ({result['kind']}) on {result['split']}:"]
  for r in rows:
    lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]),
                            r[3].rjust(widths[3])]))
  if any(info["zero_shot"] for info in result["tasks"].values()):
    lines.append("* zero-shot (evaluated, never trained on)")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def _parse(argv: Sequence[str]) -> dict[str, Any]:
  """The parsed flags as values; UsageError for a bad flag or config override."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    from visatb_jax.cli import launch  # pylint: disable=g-import-not-at-top
    argv = launch.rewrite_config_arg(argv)  # `--config demo.py` → configs/demo.py, as launch
    fv, holders = _flags(argv)
    rest = fv(list(argv))
  except (app.UsageError, flags.Error) as e:
    raise UsageError(str(e)) from None
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an undeclared field
    raise UsageError(f"bad config override: config has no field {_innermost(e)}") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected argument(s) {rest[1:]}; every input is a flag (--model DIR)")
  values = {name: holder.value for name, holder in holders.items()}
  if values["config"] is None:
    raise UsageError("--config is required, e.g. --config configs/demo.py")
  if not values["model"]:
    raise UsageError("--model is required: a run's model directory or a Hugging Face directory")
  return values


def _describe_os_error(error: OSError) -> str:
  if error.filename is None:
    return f"I/O error: {error}"
  return f"I/O error on {os.fspath(error.filename)}: {error.strerror or error}"


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command on `argv` (default sys.argv, program name first); returns the exit code."""
  argv = sys.argv if argv is None else argv
  if {"--help", "-h", "-?", "--helpshort", "--helpfull"} & set(argv[1:]):
    print(_help_text())
    return 0
  try:
    args = _parse(argv)
    # orbax logs every checkpoint operation at INFO.
    logging.set_verbosity(logging.WARNING)
    from visatb_jax.runtime import fileio, sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed()  # before anything touches a device; no-op on one host
    result = evaluate_model(args["config"], args["model"], tasks=args["tasks"],
                            split=args["split"])
    out = args["out"] or os.path.join(result["model"], f"eval_{result['split']}.json")
    if fileio.is_primary():
      fileio.atomic_write_json(out, result, sort_keys=False)
      print(format_table(result))
      print(f"written: {out}")
  except (UsageError, PipelineError, ValueError) as e:
    _error(e)
    return EXIT_ERROR
  except OSError as e:
    _error(_describe_os_error(e))
    return EXIT_ERROR
  except KeyboardInterrupt:
    _error("interrupted; nothing was written")
    return EXIT_INTERRUPTED
  return 0


def run_cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run_cli()
