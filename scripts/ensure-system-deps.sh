#!/usr/bin/env bash
# Install the Debian packages keybroker needs, only when missing. Used by `make run` and `make test`.
set -euo pipefail

missing=()
command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
command -v curl >/dev/null 2>&1 || missing+=(curl)  # the tests use it as a TLS 1.2 gRPC peer

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
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
