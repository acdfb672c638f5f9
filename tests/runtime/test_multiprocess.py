"""Two real JAX processes on localhost (jax.distributed over CPU), 2 devices each.

initialize_distributed from the VISATB_* variables and a global batch assembled from both
processes' rows; then the training loop: each process reads its own half of every global batch,
the run must log the same losses as one process on 4 devices, only process 0 may write the
metrics, and a resume from the checkpoint both processes wrote must continue the same run.
Generation for validation: the prompt rows split over both hosts' devices, the parameters
sharded across the hosts, the same tokens as one process, every answer on both processes.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from visatb_jax import train
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TESTS, "train"))
import test_train as tt  # noqa: E402  (the train tests' model and batches)

_SHARDING_WORKER = """
from visatb_jax.runtime import sharding
assert sharding.initialize_distributed() is True
assert sharding.initialize_distributed() is True  # Idempotent.
import jax, numpy as np
mesh = sharding.make_mesh({"fsdp": 2})  # data takes the rest: 2 processes x 2 devices.
rows = sharding.shard_batch({"x": np.full((2, 3), jax.process_index() + 1, np.float32)}, mesh)
total = jax.jit(lambda a: a.sum(), out_shardings=sharding.replicated(mesh))(rows["x"])
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
      mesh.shape["data"], float(total), flush=True)
"""

_TRAIN_WORKER = r"""
import json, sys
from visatb_jax.runtime import sharding
sharding.initialize_distributed()
import jax
import test_train as tt
from visatb_jax import train
workdir, crash_at = sys.argv[1], int(sys.argv[2])

def get_batch(i):
  if i == crash_at:  # both processes stop at the same step, as a preempted job would
    print("CRASH", jax.process_index(), flush=True)
    raise SystemExit(3)
  return tt.make_batch(i)

train.train(tt.new_model(), get_batch, tt.LAM, tt.CFG, workdir, mesh=sharding.make_mesh(),
            task_names=tt.TASKS)
print("DONE", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
"""


_GENERATE_WORKER = r"""
import sys
from visatb_jax.runtime import sharding
sharding.initialize_distributed()
import jax, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
import test_generate as tg
from visatb_jax.model.generate import greedy_generate
mesh = sharding.make_mesh({"fsdp": 2})  # data 2 x fsdp 2 over both processes' devices
model = tg.make_model()
state = nnx.state(model)
shardings = sharding.param_shardings(state, mesh)
# Every process holds the same initial values; each supplies the shards its devices hold.
nnx.update(model, jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i]),
    state, shardings))
ids, mask, images = tg.make_prompts()
rows = np.arange(4) % 3
out = greedy_generate(model, ids[rows], mask[rows], images[rows], max_new_tokens=tg.NEW,
                      eos_id=tg.NEVER, pad_id=tg.PAD, mesh=mesh)
print("TOKENS", jax.process_index(), out.tolist(), flush=True)
"""


def run_two_processes(tmp_path, source, *args):
  """Runs `source` as 2 processes of one jax.distributed job; returns [(returncode, output)]."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(TESTS)
  script = tmp_path / "worker.py"
  script.write_text(source)
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VISATB_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([repo, TESTS, os.path.join(TESTS, "train")]),
               VISATB_COORDINATOR=f"localhost:{port}", VISATB_NUM_PROCESSES="2",
               VISATB_PROCESS_ID=str(pid))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                  env=env, cwd=repo, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def test_two_processes_on_localhost(tmp_path):
  """initialize_distributed with the explicit VISATB_* variables, for real."""
  for pid, (code, out) in enumerate(run_two_processes(tmp_path, _SHARDING_WORKER)):
    assert code == 0, out[-3000:]
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    # Rows of process 0 hold 1, of process 1 hold 2: the global sum sees both hosts' rows.
    assert result == [f"RESULT {pid} 2 4 2 {2 * 3 * 1 + 2 * 3 * 2:.1f}"], out[-3000:]


def _train_two_processes(tmp_path, workdir, crash_at=-1):
  for pid, (code, out) in enumerate(run_two_processes(tmp_path, _TRAIN_WORKER, workdir, crash_at)):
    if crash_at >= 0:
      assert code == 3 and f"CRASH {pid}" in out, out[-3000:]
    else:
      assert code == 0 and f"DONE {pid} 2 4" in out, out[-3000:]


def _losses(workdir):
  return [(r["step"], r["loss"], r["per_task_loss"])
          for r in metrics_log.read_metrics(workdir / metrics_log.METRICS_FILE)]


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_two_processes_train_like_one_and_resume(tmp_path):
  reference = tmp_path / "one"
  train.train(tt.new_model(), tt.make_batch, tt.LAM, tt.CFG, reference,
              mesh=sharding.make_mesh(devices=jax.devices()[:4]), task_names=tt.TASKS)
  workdir = tmp_path / "two"
  _train_two_processes(tmp_path, workdir, crash_at=4)  # after step 4; last checkpoint: 3
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  _train_two_processes(tmp_path, workdir)  # resumes from step 3 on both processes
  got, want = _losses(workdir), _losses(reference)
  # One record per step: process 1 wrote nothing, and the resumed run appended from step 5.
  assert [s for s, _, _ in got] == [1, 2, 3, 4, 5, 6]
  for (_, loss_got, tasks_got), (_, loss_want, tasks_want) in zip(got, want, strict=True):
    np.testing.assert_allclose(loss_got, loss_want, rtol=1e-5)
    np.testing.assert_allclose([tasks_got[t] for t in tt.TASKS],
                               [tasks_want[t] for t in tt.TASKS], rtol=1e-5)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert json.loads((workdir / metrics_log.METRICS_FILE).read_text().splitlines()[-1])["step"] == 6


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_generation_split_over_two_hosts_gives_every_process_every_answer(tmp_path):
  sys.path.insert(0, os.path.join(TESTS, "model"))
  import test_generate as tg
  from visatb_jax.model.generate import greedy_generate
  ids, mask, images = tg.make_prompts()
  rows = np.arange(4) % 3
  want = greedy_generate(tg.make_model(), ids[rows], mask[rows], images[rows],
                         max_new_tokens=tg.NEW, eos_id=tg.NEVER, pad_id=tg.PAD).tolist()
  model_tests = os.path.join(TESTS, "model")
  for pid, (code, out) in enumerate(run_two_processes(tmp_path, _GENERATE_WORKER, model_tests)):
    assert code == 0, out[-3000:]
    assert f"TOKENS {pid} {want}" in out, out[-3000:]


_PREEMPT_WORKER = r"""
import os, signal, sys, time
from visatb_jax.runtime import sharding
sharding.initialize_distributed()
import jax
import test_train as tt
from visatb_jax import train
from visatb_jax.train.loop import Preempted
workdir, signal_at, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
served = []

def get_batch(i):
  served.append(i)
  # SIGTERM reaches process 1 only: the notice must reach process 0 through JAX's service.
  if i == signal_at and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  if i >= signal_at >= 0:
    time.sleep(0.5)  # leaves the notice time to travel before the run ends
  return tt.make_batch(i)

cfg = {**tt.CFG, "steps": steps}
try:
  train.train(tt.new_model(), get_batch, tt.LAM, cfg, workdir, mesh=sharding.make_mesh(),
              task_names=tt.TASKS)
except Preempted as e:
  print("PREEMPTED", jax.process_index(), e.step, served[0], served[-1], flush=True)
  sys.exit(143)
print("DONE", jax.process_index(), served[0] if served else -1, flush=True)
"""


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_two_processes_stop_at_the_same_step_on_sigterm_and_resume(tmp_path):
  """One host gets SIGTERM; both save the same step (JAX's preemption sync) and resume from it."""
  steps, signal_at = 12, 2
  reference = tmp_path / "one"
  train.train(tt.new_model(), tt.make_batch, tt.LAM, {**tt.CFG, "steps": steps}, reference,
              mesh=sharding.make_mesh(devices=jax.devices()[:4]), task_names=tt.TASKS)
  workdir = tmp_path / "two"
  results = run_two_processes(tmp_path, _PREEMPT_WORKER, workdir, signal_at, steps)
  stopped = []
  for pid, (code, out) in enumerate(results):
    line = [l.split() for l in out.splitlines() if l.startswith("PREEMPTED")]
    assert code == 143 and line and line[0][1] == str(pid), out[-3000:]
    stopped.append(int(line[0][2]))
  stop = stopped[0]
  assert stopped == [stop, stop] and signal_at < stop < steps, stopped
  assert str(stop) in os.listdir(workdir / "checkpoints")
  assert max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == stop

  for pid, (code, out) in enumerate(run_two_processes(tmp_path, _PREEMPT_WORKER, workdir, -1,
                                                      steps)):
    assert code == 0 and f"DONE {pid} {stop}" in out, out[-3000:]  # resumed at the saved step
  got, want = _losses(workdir), _losses(reference)
  assert [s for s, _, _ in got] == list(range(1, steps + 1))
  for (_, loss_got, _), (_, loss_want, _) in zip(got, want, strict=True):
    np.testing.assert_allclose(loss_got, loss_want, rtol=1e-5)
