#!/usr/bin/env bash
# Trains the CLINC150 intent head into DIR with BINARY (`moltbot-understanding`)
# unless DIR already holds a head trained from the same training code and data
# (a SHA-256 of those files is kept in DIR/.source-hash). Atomic: the head is
# written to a temporary directory and renamed into place.
#
#   scripts/train-intent-head.sh BINARY DIR ENCODER_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
binary="$1" dir="$2" encoder="$3"

hash=$(cat services/understanding/src/train/*.rs services/understanding/src/dataset/*.rs \
           services/understanding/src/head.rs \
           services/encoder/src/*.rs \
           services/understanding/data/clinc150/data_full_train_val.json \
           services/understanding/data/clinc150/domains.json \
           services/understanding/data/probes/out_of_scope.txt \
           services/understanding/data/synthetic_oos/synthetic_oos.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$dir/metrics.json" && "$(cat "$dir/.source-hash" 2>/dev/null)" == "$hash" ]]; then
  echo "intent-head: $dir is up to date"
  exit 0
fi
echo "intent-head: training into $dir (CLINC150, about 12 minutes on two cores; longer on a busy machine)"
tmp="$dir.tmp.$$"
rm -rf "$tmp"
"$binary" train --name clinc150 --out "$tmp" --encoder-dir "$encoder"
echo "$hash" > "$tmp/.source-hash"
rm -rf "$dir.old"
[[ -d "$dir" ]] && mv "$dir" "$dir.old"
mv "$tmp" "$dir"
rm -rf "$dir.old"
echo "intent-head: $(cat "$dir/metrics.json")"
