#!/usr/bin/env bash
# Initialise a SoftHSM2 token for keybroker and write its PINs to files (mode 600).
#
#   softhsm/init-token.sh TOKEN_DIR LABEL
#
# Creates TOKEN_DIR/softhsm2.conf, TOKEN_DIR/user.pin and TOKEN_DIR/so.pin, then the token.
# Then: set [hsm] token_label = LABEL, pin_file = TOKEN_DIR/user.pin and
# env = { SOFTHSM2_CONF = "TOKEN_DIR/softhsm2.conf" }, and create a KEK with
# `keybroker kek create recordings --config keybroker.toml`.
# Tokens are always selected by label: initialising moves a token to a new slot id.
set -euo pipefail

if [ $# -ne 2 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
dir=$(realpath -m "$1")
label=$2
here=$(cd "$(dirname "$0")" && pwd)

command -v softhsm2-util >/dev/null || { echo "softhsm2-util missing: apt-get install softhsm2" >&2; exit 1; }
mkdir -p "$dir/tokens"
sed "s#@TOKEN_DIR@#$dir/tokens#" "$here/softhsm2.conf.template" > "$dir/softhsm2.conf"
umask 077
for f in user.pin so.pin; do
  [ -s "$dir/$f" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/$f"
done
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
  --pin "$(cat "$dir/user.pin")" --so-pin "$(cat "$dir/so.pin")"
echo "token '$label' ready; SOFTHSM2_CONF=$dir/softhsm2.conf, PIN in $dir/user.pin"
