#!/usr/bin/env bash
# buf lint + format check on proto/, and a breaking-change check against the
# previous commit when it has contracts too.
set -euo pipefail
BUF=${BUF:-buf}
"$BUF" lint
"$BUF" format --diff --exit-code
if git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  "$BUF" breaking --against '.git#ref=HEAD~1'
  echo "buf: lint, format and breaking checks passed"
else
  echo "buf: lint and format passed (no previous commit with contracts to check breaking changes against)"
fi
