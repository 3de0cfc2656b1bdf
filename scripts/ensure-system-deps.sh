#!/usr/bin/env bash
# Install the Debian packages keybroker needs, only when missing: `make run` (no argument) gets
# what the broker needs; `make test` (--test) also what the test suite needs.
set -euo pipefail

# The PostgreSQL server binaries the tests start a throwaway cluster with (tests/support/postgres.py).
# Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin, so look there too.
have_postgres_server() {
  local dir name
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 \
    && command -v postgres >/dev/null 2>&1; then
    return 0
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    for name in initdb pg_ctl postgres; do
      [ -x "$dir/$name" ] || continue 2
    done
    return 0
  done
  return 1
}

missing=()
# What the broker needs (`make run`): SoftHSM2, the embedded HSM of the dev environment.
command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
# Only for the test suite (`--test`): curl as a TLS 1.2 gRPC peer, and PostgreSQL (the embedded
# default of `make run` uses SQLite).
if [ "${1:-}" = "--test" ]; then
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  have_postgres_server || missing+=(postgresql)
  command -v node >/dev/null 2>&1 || missing+=(nodejs)  # interop/node: the recording format in Node.js
  [ -x /usr/sbin/pkcsslotd ] || missing+=(opencryptoki)  # a second PKCS#11 implementation (tests/support/opencryptoki.py)
  # openCryptoki 3.23 (AES-GCM) runs in a Debian 13 root that mmdebstrap builds (scripts/ock-trixie-root.sh)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "keybroker needs: ${missing[*]} (apt-get install ${missing[*]}); run as root or install sudo" >&2
  exit 1
fi

echo "installing ${missing[*]} with apt-get"
"${sudo[@]}" apt-get update -qq
# env, not a prefix assignment: sudo would drop DEBIAN_FRONTEND (tzdata, postgresql-common ask otherwise)
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
