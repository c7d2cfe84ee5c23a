#!/usr/bin/env bash
# make test / make test-fast: make sure the servers the tests start for themselves are installed. Today that
# is PostgreSQL (Debian's `postgresql` package) for the registry tests, which run an initdb'd throwaway
# cluster on a free 127.0.0.1 port (tests/pipeline/conftest.py). Quiet when it is there; as root (CI) a
# missing server is installed with apt-get; otherwise it says how, and under CI=true a missing server fails.
set -euo pipefail

have_postgres() {
  if [ -n "${AVP_PG_BIN:-}" ]; then [ -x "$AVP_PG_BIN/initdb" ]; return; fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1
}

have_postgres && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test services: installing PostgreSQL (apt-get install postgresql) for the registry tests"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; then
    have_postgres && exit 0
  fi
fi
msg="no PostgreSQL server binaries (initdb, postgres): install them with 'sudo apt-get install postgresql' or set AVP_PG_BIN"
if [ "${CI:-}" = "true" ]; then
  echo "test services: $msg (required in CI)" >&2
  exit 2
fi
echo "test services: $msg; the PostgreSQL registry tests will be skipped" >&2
