#!/bin/sh
# Container entrypoint: `keybroker <command> ...` (default command: serve), with a private umask
# so that what the broker creates (journal, SQLite) is readable by its user only.
#
# Kubernetes' service-link variables (KEYBROKER_SERVICE_HOST, KEYBROKER_PORT_50051_TCP_ADDR, ...)
# need no handling here: the settings loader ignores them by name and value shape, and still
# refuses a misspelt setting such as KEYBROKER_SERVER_LISTN. The pods set enableServiceLinks:
# false anyway.
set -eu
umask 077

if [ "$#" -eq 0 ]; then
  set -- serve
fi
exec keybroker "$@"
