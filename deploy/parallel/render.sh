#!/usr/bin/env bash
# N shards of one render on one machine with GNU parallel, sharing a local Redis.
# (On one machine one `emailpers render` already uses every core; shards pay off
# when the same command runs on several machines, or to mimic a cluster here.)
#   deploy/parallel/render.sh campaign.toml out/ 4
set -euo pipefail
campaign=${1:?campaign.toml} out=${2:?output folder} shards=${3:-4}
backend=${EMAILPERS_BACKEND:-redis://127.0.0.1:6379/0}
# --halt never: every shard runs to its end; `emailpers status` then says what the whole run deserves.
parallel --halt never --line-buffer --tagstring 'shard {}' \
    emailpers render "$campaign" --out "$out" --shard "{}/$shards" --backend "$backend" --no-progress \
    ::: $(seq 0 $((shards - 1))) || true
exec emailpers status "$out"
