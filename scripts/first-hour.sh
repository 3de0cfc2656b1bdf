#!/usr/bin/env bash
# A newcomer's first hour, unattended, as README.md tells it: from a fresh clone, `make run` in
# the background, every command block of README.md and docs/ in order (`make demo` among them;
# scripts/doc_blocks.py), Ctrl-C for the broker, then `make test`.
#
#   scripts/first-hour.sh [--no-test] [REPOSITORY]
#
# REPOSITORY is a git URL or path (default: the repository this script is in; its committed
# HEAD is what gets cloned). Meant for a Debian/Ubuntu machine with python3, make and git, as
# root or with sudo: `make run` installs SoftHSM2 and `make test` PostgreSQL and curl when they
# are missing. The clone is left in a temporary folder (printed) for a look afterwards.
# CI runs the non-interactive part of this through the test suite (tests/test_doc_blocks.py).
set -euo pipefail

run_tests=1
if [ "${1:-}" = "--no-test" ]; then
  run_tests=0
  shift
fi
source=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}

work=$(mktemp -d "${TMPDIR:-/tmp}/keybroker-first-hour.XXXXXX")
echo "first hour: cloning $source into $work/keybroker"
git clone --quiet "$source" "$work/keybroker"
cd "$work/keybroker"

# A newcomer has no keybroker settings in the environment.
while IFS= read -r var; do unset "$var"; done < <(env | sed -n 's/^\(KEYBROKER_[A-Za-z0-9_]*\)=.*/\1/p')

echo "first hour: make run (background), then every block of README.md and docs/"
python3 scripts/doc_blocks.py run

if [ "$run_tests" -eq 1 ]; then
  echo "first hour: make test"
  make test
fi
echo "first hour: all done in $work/keybroker"
