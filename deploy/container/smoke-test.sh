#!/usr/bin/env bash
# Build the runtime image without a registry and run it as Kubernetes would: read-only root file
# system, user 10001, no capabilities, no-new-privileges, the PKCS#11 module mounted read-only
# at /opt/hsm, kubelet's service-link variables in the environment, processes = "auto"; then
# probe its health with deploy/container/healthcheck.py inside the container. Not part of
# `make test` (it needs root, a Debian mirror and about 3-6 minutes); docs/DEPLOYMENT.md has
# the figures of a run.
#
#   sudo apt-get install buildah mmdebstrap softhsm2   # once
#   sudo deploy/container/smoke-test.sh                # from the repository root, after make venv
set -euo pipefail
B=(buildah --storage-driver vfs)
work=$(mktemp -d /tmp/keybroker-smoke.XXXXXX)
chmod 0755 "$work"  # the container's user must reach $work/state
port=${PORT:-50999}
cleanup() {
  local rc=$?
  set +e
  # unshare --fork ignores SIGTERM; the broker (init of its PID namespace) stops on it
  pkill -TERM -f "keybroker serve --config $work/state" && sleep 5
  [ -n "${pid:-}" ] && kill -KILL "$pid" 2>/dev/null
  for c in ${base:-} ${ctr:-}; do "${B[@]}" rm "$c" >/dev/null 2>&1; done
  "${B[@]}" rmi localhost/keybroker:smoke localhost/keybroker-base:smoke >/dev/null 2>&1
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
t0=$(date +%s)
mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates bookworm "$work/base.tar"
base=$("${B[@]}" from scratch)
"${B[@]}" add "$base" "$work/base.tar" / >/dev/null
"${B[@]}" commit --quiet "$base" localhost/keybroker-base:smoke >/dev/null
"${B[@]}" rm "$base" >/dev/null && base=
echo "base image: $(( $(date +%s) - t0 )) s"
# pip inside the build uses this machine's pip configuration and CA bundle when it has them
mounts=()
for f in /etc/pip.conf /etc/xdg/pip /etc/ssl/certs/ca-certificates.crt /opt/wheels /opt/pypi; do
  [ -e "$f" ] && mounts+=(-v "$f:$f:ro")
done
"${B[@]}" bud --quiet --format docker --isolation chroot --network host --pull-never "${mounts[@]}" \
  --build-arg PYTHON_IMAGE=localhost/keybroker-base:smoke --target runtime \
  -f deploy/container/Dockerfile -t localhost/keybroker:smoke . >/dev/null
echo "image built: $(( $(date +%s) - t0 )) s"

# A dev environment (SoftHSM token, PKI, issuer) on the host, given to the container's user.
.venv/bin/keybroker dev init --state-dir "$work/state" --listen "127.0.0.1:$port" >/dev/null
chown -R 10001:10001 "$work/state"
module_dir=$(dirname "$(readlink -f /usr/lib/softhsm/libsofthsm2.so)")
ctr=$("${B[@]}" from --pull-never localhost/keybroker:smoke)
root=$("${B[@]}" mount "$ctr")
mkdir -p "$root/opt/hsm" "$root$work"
unshare --mount --pid --fork --kill-child sh -ec "
  mount --bind '$root' '$root' && mount -o remount,bind,ro '$root'
  mount -t tmpfs -o mode=1777,size=64m tmpfs '$root/tmp'
  mkdir -p '$root$work' && mount --bind '$work' '$root$work'
  mount --bind '$module_dir' '$root/opt/hsm' && mount -o remount,bind,ro '$root/opt/hsm'
  mount -t proc proc '$root/proc' && mount --rbind /dev '$root/dev'
  if touch '$root/written' 2>/dev/null; then echo 'root file system is writable' >&2; exit 1; fi
  exec chroot '$root' setpriv --reuid 10001 --regid 10001 --clear-groups --no-new-privs \
    --bounding-set -all env -i PATH=/opt/keybroker/bin:/usr/bin:/bin HOME=/var/lib/keybroker \
    PYTHONDONTWRITEBYTECODE=1 KEYBROKER_SERVER_PROCESSES=auto \
    KEYBROKER_HSM_MODULE=/opt/hsm/libsofthsm2.so KEYBROKER_SERVICE_HOST=10.96.0.10 \
    KEYBROKER_PORT_50051_TCP_ADDR=10.96.0.10 \
    /opt/keybroker/libexec/entrypoint.sh serve --config '$work/state/keybroker.toml'
" > "$work/broker.log" 2>&1 &
pid=$!
probe() {
  local target
  target=$(pgrep -f "keybroker serve --config $work/state" | head -1 || true)
  [ -n "$target" ] || return 1
  nsenter -t "$target" -m chroot "$root" setpriv --reuid 10001 --regid 10001 --clear-groups \
    /opt/keybroker/bin/python /opt/keybroker/libexec/healthcheck.py --ready \
    --target "127.0.0.1:$port" --server-name localhost --ca "$work/state/pki/ca.pem" \
    --cert "$work/state/pki/client.pem" --key "$work/state/pki/client.key"
}
for _ in $(seq 60); do
  if probe 2>/dev/null; then
    echo "SERVING (probed inside the container): $(( $(date +%s) - t0 )) s"
    grep -E "processes = auto|listening" "$work/broker.log"
    exit 0
  fi
  sleep 1
done
echo "the broker did not become ready; its log:" >&2
cat "$work/broker.log" >&2
exit 1
