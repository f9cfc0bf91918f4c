#!/usr/bin/env bash
# Mounts a bucket read-only with gcsfuse, installing gcsfuse from Google's apt repository if it is
# missing. `launch/tpu_vm.sh mount` runs it on every TPU VM worker: Grain reads training data from
# local files only (README, "Object storage").
#
#   launch/gcsfuse_mount.sh BUCKET DIR
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 BUCKET DIR" >&2; exit 2; }
bucket=$1 dir=$2
if ! command -v gcsfuse >/dev/null; then
  keyring=/usr/share/keyrings/cloud.google.asc
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
if mountpoint -q "$dir"; then
  echo "$dir: already mounted"
  exit 0
fi
sudo mkdir -p "$dir"
sudo chown "$(id -u):$(id -g)" "$dir"
gcsfuse -o ro --implicit-dirs "$bucket" "$dir"
