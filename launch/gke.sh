#!/usr/bin/env bash
# TPU training on GKE: a JobSet with one pod per TPU host (JAX detects the slice), applied with
# kubectl; or, with XPK=1, the same workload through xpk.
#
#   launch/gke.sh CONFIG WORKDIR [--config.key=value ...]       # WORKDIR: gs://bucket/run
#   DRY_RUN=1 launch/gke.sh ...                                  # print manifest + commands
#
# Environment: IMAGE (a container with this checkout installed, required); NAME (evejax-<time>);
# TPU_ACCELERATOR (tpu-v5p-slice), TPU_TOPOLOGY (4x4x4), HOSTS (16: hosts in the topology),
# CHIPS_PER_HOST (4), MAX_RESTARTS (3: JobSet restarts after a failure; runs resume from
# their checkpoints). DATA_BUCKET mounts that bucket read-only at /mnt/DATA_BUCKET in every pod
# (training data: Grain reads local files only) through GKE's Cloud Storage FUSE CSI driver, which
# the cluster must have enabled, with SERVICE_ACCOUNT a Kubernetes service account allowed to read
# the bucket (Workload Identity). XPK=1 with CLUSTER, TPU_TYPE (v5p-128), NUM_SLICES (1) uses xpk
# instead.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 2 ]] || die "usage: $0 CONFIG WORKDIR [--config.key=value ...]"
[[ -n "${IMAGE:-}" ]] || die "set IMAGE to a container image with evejax installed"
name=${NAME:-evejax-$(date +%Y%m%d-%H%M%S)}
command=$(train_command python "$@" --config.distributed.auto=True)

if [[ "${XPK:-0}" == 1 ]]; then
  [[ -n "${CLUSTER:-}" ]] || die "set CLUSTER for xpk"
  run xpk workload create --cluster="$CLUSTER" --workload="$name" --docker-image="$IMAGE" \
    --tpu-type="${TPU_TYPE:-v5p-128}" --num-slices="${NUM_SLICES:-1}" --command="$command"
  exit 0
fi

hosts=${HOSTS:-16}
# The data bucket, when given: a CSI ephemeral volume (pod annotation, volume, mount).
pod_metadata='' pod_extra='' mounts=''
if [[ -n "${DATA_BUCKET:-}" ]]; then
  pod_metadata=$(cat <<YAML
          metadata:
            annotations:
              gke-gcsfuse/volumes: "true"
YAML
)
  pod_extra=$(cat <<YAML
            serviceAccountName: ${SERVICE_ACCOUNT:-default}
            volumes:
            - name: data
              csi:
                driver: gcsfuse.csi.storage.gke.io
                readOnly: true
                volumeAttributes:
                  bucketName: $DATA_BUCKET
                  mountOptions: implicit-dirs
YAML
)
  mounts=$(cat <<YAML
              volumeMounts:
              - name: data
                mountPath: /mnt/$DATA_BUCKET
                readOnly: true
YAML
)
fi
# YAML single-quoted scalar: '' stands for '.
yaml_command="'${command//\'/\'\'}'"
manifest=$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: ${MAX_RESTARTS:-3}
  replicatedJobs:
  - name: slice
    replicas: 1
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        backoffLimit: 0
        template:
$pod_metadata
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: ${TPU_ACCELERATOR:-tpu-v5p-slice}
              cloud.google.com/gke-tpu-topology: ${TPU_TOPOLOGY:-4x4x4}
            containers:
            - name: evejax
              image: $IMAGE
              command: ['bash', '-c', $yaml_command]
              resources:
                limits:
                  google.com/tpu: ${CHIPS_PER_HOST:-4}
$mounts
$pod_extra
YAML
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "$manifest"
  quote kubectl apply -f -
else
  kubectl apply -f - <<<"$manifest"
fi
