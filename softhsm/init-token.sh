#!/usr/bin/env bash
# Initialise a SoftHSM2 token for keybroker. No PIN ever appears on a command line.
#
#   softhsm/init-token.sh TOKEN_DIR LABEL < so-pin          (SO PIN: first line of stdin)
#   softhsm/init-token.sh TOKEN_DIR LABEL --so-pin-file FILE
#
# The SO PIN is read from stdin (prompted for on a terminal) or FILE, which must not be inside
# TOKEN_DIR: it is never stored beside the user PIN (keep it with your other break-glass secrets).
# The user PIN is TOKEN_DIR/user.pin (mode 600), generated if absent. Creates
# TOKEN_DIR/softhsm2.conf and the token. Then set [hsm] token_label = LABEL,
# pin_file = TOKEN_DIR/user.pin and env = { SOFTHSM2_CONF = "TOKEN_DIR/softhsm2.conf" }, and create
# a KEK with `keybroker kek create recordings --offline --config keybroker.toml`.
# Tokens are always selected by label: initialising moves a token to a new slot id.
set -euo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[ $# -eq 2 ] || [ $# -eq 4 ] || usage
dir=$(realpath -m "$1")
label=$2
so_pin_file=
if [ $# -eq 4 ]; then
  [ "$3" = "--so-pin-file" ] || usage
  so_pin_file=$(realpath -m "$4")
  case "$so_pin_file/" in
    "$dir"/*) echo "the SO PIN file must not be inside $dir (beside the user PIN)" >&2; exit 2 ;;
  esac
  [ -s "$so_pin_file" ] || { echo "$so_pin_file: missing or empty" >&2; exit 2; }
fi
if [ -e "$dir/so.pin" ]; then
  echo "$dir/so.pin: the SO PIN is no longer kept beside the user PIN; move it elsewhere and" \
    "pass it with --so-pin-file FILE or on stdin" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)

module=${SOFTHSM2_MODULE:-}
if [ -z "$module" ]; then
  for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -e "$candidate" ]; then module=$candidate; break; fi
  done
fi
[ -n "$module" ] || { echo "libsofthsm2.so not found: apt-get install softhsm2 (or set SOFTHSM2_MODULE)" >&2; exit 1; }

mkdir -p "$dir/tokens"
sed "s#@TOKEN_DIR@#$dir/tokens#" "$here/softhsm2.conf.template" > "$dir/softhsm2.conf"
umask 077
[ -s "$dir/user.pin" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/user.pin"

if [ -n "$so_pin_file" ]; then
  exec 3<"$so_pin_file"
elif [ -t 0 ]; then
  read -rsp "SO PIN for token '$label' (4 or more characters): " so_pin
  echo >&2
  exec 3< <(printf '%s\n' "$so_pin")
  unset so_pin
else
  exec 3<&0
fi
SOFTHSM2_CONF="$dir/softhsm2.conf" "${PYTHON:-python3}" "$here/init_token.py" \
  "$module" "$label" "$dir/user.pin" <&3
echo "token '$label' ready; SOFTHSM2_CONF=$dir/softhsm2.conf, user PIN in $dir/user.pin"
