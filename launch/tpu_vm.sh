#!/usr/bin/env bash
# Cloud TPU VM pods with gcloud: create the VM, install this checkout on every worker, mount the
# data bucket, run one training process per worker (JAX detects the pod), follow the logs or wait
# for the end, delete the VM.
#
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                          # copy + venv with evejax[tpu] on all workers
#   launch/tpu_vm.sh mount BUCKET [DIR]                      # gcsfuse, read-only, at DIR (/mnt/BUCKET)
#   launch/tpu_vm.sh run CONFIG WORKDIR [--config.key=value ...]   # WORKDIR: gs://bucket/run
#   launch/tpu_vm.sh logs | wait | teardown                 # wait: until worker 0's run ends
#
# Environment: TPU_NAME, ZONE (required); PROJECT; ACCELERATOR_TYPE (v5p-64);
# RUNTIME_VERSION (v2-alpha-tpuv5); SPOT=1 for spot capacity. DRY_RUN=1 prints the gcloud commands.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || die "usage: $0 create|setup|mount|run|logs|wait|teardown [ARGS...]"
[[ -n "${TPU_NAME:-}" && -n "${ZONE:-}" ]] || die "set TPU_NAME and ZONE"
action=$1
shift
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")
# shellcheck disable=SC2088  # '~' expands on the workers, not here.
remote_dir='~/evejax' log='~/evejax_train.log' status='~/evejax_train.status'
venv=.venv  # In remote_dir, where `run` starts.

case "$action" in
  create)
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE:-v5p-64}" \
      --version="${RUNTIME_VERSION:-v2-alpha-tpuv5}" "${extra[@]}"
    ;;
  setup)
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    archive=/tmp/evejax-${USER:-user}.tar.gz
    run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=.venv .
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/evejax.tar.gz" "${where[@]}" \
      --worker=all
    # evejax needs Python >= 3.11 and the TPU VM images have 3.10: a venv of a uv-managed Python
    # (as MaxText sets up), inside the checkout; [tpu]: the TPU build of jax.
    install="mkdir -p $remote_dir && tar -xzf /tmp/evejax.tar.gz -C $remote_dir && cd $remote_dir"
    install+=" && python3 -m pip install -q --user uv"
    install+=" && python3 -m uv venv -q --allow-existing --python 3.12 $venv"
    install+=" && python3 -m uv pip install -q --python $venv/bin/python -e '.[tpu]'"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$install"
    ;;
  mount)
    # Training data: Grain reads local files only, so the bucket is mounted on every worker
    # (README, "Object storage"); launch/gcsfuse_mount.sh came with `setup`.
    [[ $# -ge 1 ]] || die "usage: $0 mount BUCKET [DIR]"
    mount="bash $remote_dir/launch/gcsfuse_mount.sh $(quote "$1" "${2:-/mnt/$1}")"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$mount"
    ;;
  run)
    [[ $# -ge 2 ]] || die "usage: $0 run CONFIG WORKDIR [--config.key=value ...]"
    # Detached, so a dropped ssh connection does not stop training; `logs` follows worker 0 and
    # `wait` returns its exit status, which the run leaves in $status.
    train="$(train_command "$venv/bin/python" "$@" --config.distributed.auto=True); echo \$? > $status"
    cmd="cd $remote_dir && rm -f $status && nohup $(quote bash -c "$train") > $log 2>&1 &"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$cmd"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=0 --command "tail -f $log"
    ;;
  wait)
    # Polls worker 0 (process 0 writes the checkpoints): its log's tail, and the run's exit status.
    wait="while [ ! -e $status ]; do sleep 60; done; tail -n 5 $log; exit \$(cat $status)"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=0 --command "$wait"
    ;;
  teardown)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    die "unknown action $action: use create, setup, mount, run, logs, wait or teardown"
    ;;
esac
