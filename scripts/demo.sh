#!/usr/bin/env bash
# The main job on the embedded default: encrypt + compress + shard CIFAR-10 (the copies in
# ../shared/data) into verified WebDataset shards on local disk, as a Prefect flow on Prefect's
# local ephemeral API. Creates a demo owner key (mode 0600) under runs/ the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
DATA="${ETC_DATA_SHARED:-../shared/data}"
KEY=runs/demo/owner.key
OUT="${1:-runs/demo/cifar10-etc}"
mkdir -p runs/demo
[ -f "$KEY" ] || etc-data keys new --owner demo --out "$KEY"
etc-data prepare \
  --source "$DATA/cifar10-train-jpeg.zip" --source "$DATA/cifar10-test-jpeg.zip" \
  --owner demo --key "$KEY" --dataset cifar10 --out "$OUT" \
  --scheme etc --block-size 16 --codec jpeg:q=85,sub=444
# what the cloud and model developers receive besides the shards: the owner's public key
etc-data keys public --key "$KEY" --out runs/demo/owner.pub
etc-data verify "$OUT" --trust runs/demo/owner.pub
