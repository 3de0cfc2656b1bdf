#!/usr/bin/env bash
# A minimal Debian 13 (trixie) root with openCryptoki 3.23 (its software token offers CKM_AES_GCM,
# Debian 12's 3.8 does not) and a Python venv with python-pkcs11, for the HSM adapter tests
# and the server tests (tests/support/ock_trixie.py runs pkcsslotd and the tests inside it). Built once with
# mmdebstrap into DIR (default .venv/ock-trixie) and reused while its stamp matches this script's
# stamp; `make clean` removes it. Needs root and Debian's mirror (deb.debian.org) and PyPI.
set -euo pipefail

MIRROR=${TRIXIE_MIRROR:-http://deb.debian.org/debian}
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-$repo/.venv/ock-trixie}
stamp_file="$root/.keybroker-root"

# The root's venv gets keybroker's runtime dependencies (pyproject.toml) and what the server
# tests run there need (tests/server/test_opencryptoki.py); keybroker itself comes from the
# repository's src at run time. The stamp changes with this script and with that list.
requirements=$(python3 -c '
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join([*deps, "pytest>=8", "hypothesis>=6.100", "opentelemetry-proto>=1.45,<2"]))
' "$repo/pyproject.toml")
STAMP="v2-$(printf '%s\n' "$requirements" | cat - "$0" | sha256sum | cut -c1-16)"

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$STAMP" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "building the openCryptoki 3.23 test root ($root) needs root (CI runs as root)" >&2
  exit 1
fi
if ! command -v mmdebstrap >/dev/null 2>&1; then
  echo "installing mmdebstrap with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi
[ -f /usr/share/keyrings/debian-archive-trixie-stable.gpg ] || {
  echo "no trixie archive key (/usr/share/keyrings/debian-archive-trixie-stable.gpg):" \
    "apt-get install debian-archive-keyring" >&2
  exit 1
}

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9  # one build at a time; whoever waited finds it built
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$STAMP" ]; then
  exit 0
fi

# pip inside the root trusts what the host trusts (a proxy's CA, if there is one)
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$ca" ] || { echo "no CA bundle at $ca for pip inside the root" >&2; exit 1; }

started=$(date +%s)
rm -rf --one-file-system "$root" "$root.new"
echo "building the openCryptoki 3.23 test root in $root (Debian trixie, about 2 minutes)"
# mmdebstrap mounts /proc and /sys for the hooks (in a mount namespace of its own here, so a
# killed build leaves no mounts behind) and copies the host's resolv.conf.
unshare --mount --propagation private printf '%s\n' "$requirements" > "$root.requirements"
mmdebstrap --quiet --variant=apt --include=opencryptoki,python3,python3-venv,softhsm2 \
  --customize-hook="cp '$ca' \"\$1/tmp/ca.crt\"" \
  --customize-hook="cp '$root.requirements' \"\$1/tmp/requirements.txt\"" \
  --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin PIP_CERT=/tmp/ca.crt PIP_CONFIG_FILE=/dev/null \
    /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt' \
  --customize-hook='rm -f "$1/tmp/ca.crt" "$1/tmp/requirements.txt"' \
  --customize-hook='mkdir -p "$1/opt/keybroker/repo"' \
  --customize-hook='cp -a "$1/var/lib/opencryptoki" "$1/opt/keybroker/ock-state"' \
  trixie "$root.new" "$MIRROR"
rm -f "$root.requirements"
echo "$STAMP" > "$root.new/.keybroker-root"
mv "$root.new" "$root"
echo "openCryptoki test root built in $(( $(date +%s) - started )) s"
