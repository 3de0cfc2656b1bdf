#!/bin/sh
# Container entrypoint: `keybroker <command> ...` (default command: serve).
#
# - Files the broker creates (journal, SQLite) are private: umask 077.
# - Kubernetes injects service-link variables for every Service in the namespace
#   (KEYBROKER_SERVICE_HOST, KEYBROKER_PORT_50051_TCP_ADDR, KEYBROKER_HEADLESS_SERVICE_PORT, ...)
#   unless the pod sets enableServiceLinks: false (deploy/kubernetes does). Their names start with
#   KEYBROKER_, the prefix of the broker's own setting overrides, and the settings loader refuses
#   unknown ones; so this script drops exactly the service-link shapes before it starts the broker.
#   A misspelt setting such as KEYBROKER_SERVER_LISTN is kept, and still stops start-up.
set -eu
umask 077

for var in $(env | sed -n 's/^\(KEYBROKER_[A-Za-z0-9_]*\)=.*/\1/p'); do
  case "$var" in
    KEYBROKER_SERVICE_HOST | KEYBROKER_SERVICE_PORT | KEYBROKER_SERVICE_PORT_* | \
    KEYBROKER_*_SERVICE_HOST | KEYBROKER_*_SERVICE_PORT | KEYBROKER_*_SERVICE_PORT_* | \
    KEYBROKER_PORT | KEYBROKER_PORT_*_TCP* | KEYBROKER_PORT_*_UDP* | KEYBROKER_PORT_*_SCTP* | \
    KEYBROKER_*_PORT | KEYBROKER_*_PORT_*_TCP* | KEYBROKER_*_PORT_*_UDP* | KEYBROKER_*_PORT_*_SCTP*)
      unset "$var" ;;
  esac
done

if [ "$#" -eq 0 ]; then
  set -- serve
fi
exec keybroker "$@"
