#!/usr/bin/env bash
# A minimal Debian 13 (trixie) root with openCryptoki 3.23 (its software token offers CKM_AES_GCM,
# Debian 12's 3.8 does not) and a Python venv with python-pkcs11, for the HSM adapter tests
# (tests/support/ock_trixie.py runs pkcsslotd and the test driver inside it). Built once with
# mmdebstrap into DIR (default .venv/ock-trixie) and reused while its stamp matches this script's
# STAMP; `make clean` removes it. Needs root and Debian's mirror (deb.debian.org) and PyPI.
set -euo pipefail

STAMP=v1  # bump when what is built here changes: roots with another stamp are rebuilt
MIRROR=${TRIXIE_MIRROR:-http://deb.debian.org/debian}
# the same range as pyproject.toml
PKCS11_PIN='python-pkcs11>=0.10.1,<0.11'

root=${1:-.venv/ock-trixie}
stamp_file="$root/.keybroker-root"

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
unshare --mount --propagation private mmdebstrap --quiet --variant=apt --include=opencryptoki,python3,python3-venv \
  --customize-hook="cp '$ca' \"\$1/tmp/ca.crt\"" \
  --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
  --customize-hook="chroot \"\$1\" env -i PATH=/usr/bin:/bin PIP_CERT=/tmp/ca.crt PIP_CONFIG_FILE=/dev/null \
    /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check '$PKCS11_PIN'" \
  --customize-hook='rm -f "$1/tmp/ca.crt"' \
  --customize-hook='mkdir -p "$1/opt/keybroker/src"' \
  --customize-hook='cp -a "$1/var/lib/opencryptoki" "$1/opt/keybroker/ock-state"' \
  trixie "$root.new" "$MIRROR"
echo "$STAMP" > "$root.new/.keybroker-root"
mv "$root.new" "$root"
echo "openCryptoki test root built in $(( $(date +%s) - started )) s"
