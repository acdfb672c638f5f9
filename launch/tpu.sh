#!/usr/bin/env bash
# Runs visatb_jax on a Cloud TPU VM or a multi-host TPU pod slice.
#
# Steps, each on every worker of the TPU (gcloud --worker=all):
#   1. code:    copy this checkout (tarball + `gcloud compute tpus tpu-vm scp`), or `git clone`
#               a repository URL given with --repo;
#   2. install: a virtualenv in the code directory, `pip install -e '.[tpu]'`;
#   3. run:     the same `python -m visatb_jax.launch --config ... --workdir ...` on all workers
#               at once, with VISATB_DISTRIBUTED=1 so visatb_jax.sharding.initialize_distributed
#               calls jax.distributed.initialize(); each worker logs to its own file.
# See launch/README.md; `bash launch/tpu.sh --help` for the options.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: bash launch/tpu.sh --tpu NAME --zone ZONE [options] [--config.x=y ...] [-- launch flags]

Runs `python -m visatb_jax.launch` on every worker of a Cloud TPU VM / pod slice.

Required (flag or environment variable):
  --tpu NAME          TPU VM or pod slice name                     (env TPU_NAME)
  --zone ZONE         its zone, e.g. us-central2-b                 (env ZONE, CLOUDSDK_COMPUTE_ZONE)
Options:
  --project ID        Google Cloud project (env PROJECT, CLOUDSDK_CORE_PROJECT; else gcloud's default)
  --config PATH       config file, relative to the code directory  (default configs/demo.py)
  --workdir DIR       run directory on the workers (default: launch's runs/<config name>);
                      on a pod slice it must be storage every worker sees (NFS / Filestore /
                      a gcsfuse mount), as checkpoints are written by all processes
  --config.KEY=VALUE  config override, passed through (repeatable)
  -- ARGS...          everything after `--` is passed to visatb_jax.launch unchanged
  --repo URL          git clone URL on the workers instead of copying this checkout
  --branch REF        branch or tag to clone with --repo (default: the remote's HEAD)
  --remote-dir DIR    code directory on the workers, relative to the home directory
                      (default visatb_jax)
  --log-dir DIR       log directory on the workers, relative to --remote-dir (default logs);
                      worker N writes DIR/worker-N.log, worker 0 also streams to this terminal
  --worker W          `all` (default) or a worker index, e.g. 0 to debug one host
  --env KEY=VALUE     environment variable for the run on every worker (repeatable)
  --skip-copy         do not copy / clone the code (already there)
  --skip-install      do not create the virtualenv / pip install (already done)
  --dry-run           print the commands instead of running them
  -h, --help          this help

Example:
  bash launch/tpu.sh --tpu my-v4-32 --zone us-central2-b --project my-proj \
      --config configs/demo.py --workdir /mnt/shared/runs/demo --config.train.epochs=2
EOF
}

die() {
  echo "tpu.sh: error: $*" >&2
  echo "Try 'bash launch/tpu.sh --help'." >&2
  exit 2
}

# Shell-readable form of one argument: as is when it is plain, else single-quoted.
quote() {
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

DRY_RUN=0
# Runs a command, or prints it (one line, copy-pasteable) with --dry-run.
run() {
  if ((DRY_RUN)); then
    local first=1 arg
    for arg in "$@"; do
      ((first)) || printf ' '
      quote "$arg"
      first=0
    done
    printf '\n'
  else
    "$@"
  fi
}

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
PROJECT="${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
CONFIG="configs/demo.py"
WORKDIR=""
REPO_URL=""
BRANCH=""
REMOTE_DIR="visatb_jax"
LOG_DIR="logs"
WORKER="all"
SKIP_COPY=0
SKIP_INSTALL=0
LAUNCH_ARGS=()
RUN_ENV=()

# The value of option $1 given either as `--opt=value` ($2 is then unused) or `--opt value`.
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-copy) SKIP_COPY=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --) shift; LAUNCH_ARGS+=("$@"); break ;;
    # Overrides first: `--config.x=y` must not be taken for `--config=...`.
    --config.*) LAUNCH_ARGS+=("$arg"); shift ;;
    --*=*)
      name="${arg%%=*}"
      value="${arg#*=}"
      shift
      set -- "$name" "$value" "$@"
      ;;
    --tpu|--zone|--project|--config|--workdir|--repo|--branch|--remote-dir|--log-dir|--worker|--env)
      need_value "$@"
      case "$arg" in
        --tpu) TPU_NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --repo) REPO_URL="$2" ;;
        --branch) BRANCH="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
        --log-dir) LOG_DIR="$2" ;;
        --worker) WORKER="$2" ;;
        --env)
          [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$2'"
          RUN_ENV+=("$2")
          ;;
      esac
      shift 2
      ;;
    *) die "unknown argument '$arg' (launch flags go after '--')" ;;
  esac
done

[[ -n "$TPU_NAME" ]] || die "the TPU name is required (--tpu NAME or env TPU_NAME)"
[[ -n "$ZONE" ]] || die "the zone is required (--zone ZONE or env ZONE)"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be 'all' or an index"
[[ "$REMOTE_DIR" != /* && "$REMOTE_DIR" != *..* ]] \
  || die "--remote-dir must be relative to the home directory"
# visatb_jax.launch also looks a bare name up in configs/.
if [[ -z "$REPO_URL" && $SKIP_COPY -eq 0 && ! -f "$ROOT/${CONFIG%%:*}" \
      && ! -f "$ROOT/configs/${CONFIG%%:*}" ]]; then
  die "config '$CONFIG' not found under $ROOT (paths are relative to the code directory)"
fi

GCLOUD_FLAGS=("--zone=$ZONE" "--worker=$WORKER")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=("--project=$PROJECT")

# Runs a bash command line on the workers.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --command="$1"
}

remote_dir="$(quote "$REMOTE_DIR")"

# ------------------------------------------------------------------------------------- 1. code
if ((SKIP_COPY)); then
  :
elif [[ -n "$REPO_URL" ]]; then
  ref="${BRANCH:-HEAD}"
  branch_flag=""
  [[ -n "$BRANCH" ]] && branch_flag="--branch $(quote "$BRANCH") "
  # Update in place when already cloned, so the virtualenv and logs inside survive.
  on_workers "set -e; if [ -d $remote_dir/.git ]; then \
git -C $remote_dir fetch --depth 1 origin $(quote "$ref") && \
git -C $remote_dir checkout --force FETCH_HEAD; \
else git clone --depth 1 ${branch_flag}$(quote "$REPO_URL") $remote_dir; fi"
else
  if ((DRY_RUN)); then
    tarball="/tmp/visatb_jax_code.tgz"
  else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    tarball="$tmp/visatb_jax_code.tgz"
  fi
  # Only the code: no virtualenvs, run directories, git history or caches.
  run tar -czf "$tarball" -C "$ROOT" --exclude=./.git --exclude='./.venv*' --exclude=./runs \
    --exclude=./logs --exclude='*/__pycache__' --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:visatb_jax_code.tgz" "${GCLOUD_FLAGS[@]}"
  on_workers "set -e; mkdir -p $remote_dir && tar -xzf visatb_jax_code.tgz -C $remote_dir \
&& rm -f visatb_jax_code.tgz"
fi

# ---------------------------------------------------------------------------------- 2. install
if ((SKIP_INSTALL == 0)); then
  on_workers "set -e; cd $remote_dir && python3 -m venv .venv && . .venv/bin/activate \
&& pip install -q -U pip && pip install -q -e '.[tpu]'"
fi

# -------------------------------------------------------------------------------------- 3. run
launch="python -m visatb_jax.launch --config $(quote "$CONFIG")"
[[ -n "$WORKDIR" ]] && launch+=" --workdir $(quote "$WORKDIR")"
for arg in "${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"}"; do
  launch+=" $(quote "$arg")"
done
exports="export VISATB_DISTRIBUTED=1"
for kv in "${RUN_ENV[@]+"${RUN_ENV[@]}"}"; do
  exports+="; export ${kv%%=*}=$(quote "${kv#*=}")"
done
log_dir="$(quote "$LOG_DIR")"
# The worker index comes from the TPU VM metadata server (the hostname where it is unreachable).
# shellcheck disable=SC2016  # $id, $log expand on the worker, not here.
worker_id='id=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
on_workers "set -eo pipefail; cd $remote_dir && . .venv/bin/activate && mkdir -p $log_dir; \
$worker_id; log=$log_dir/worker-\$id.log; echo \"worker \$id: logging to ~/$REMOTE_DIR/\$log\"; \
$exports; \
if [ \"\$id\" = 0 ]; then $launch 2>&1 | tee \"\$log\"; else $launch > \"\$log\" 2>&1; fi"

if ((DRY_RUN == 0)); then
  echo "tpu.sh: done. Worker logs: ~/$REMOTE_DIR/$LOG_DIR/worker-*.log on each worker, e.g." >&2
  echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME ${GCLOUD_FLAGS[*]} --command='tail -n 20 $REMOTE_DIR/$LOG_DIR/*.log'" >&2
fi
