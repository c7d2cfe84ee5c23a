#!/usr/bin/env bash
# make test, make test-fast and make airflow-cluster: make sure the servers they start are installed: PostgreSQL
# (Debian's `postgresql` package) for the registry tests and the Celery cluster test, Redis (`redis-server`)
# as that cluster's broker, and Chromium (`chromium`) that the operator UI tests drive with Playwright
# (browser downloads are not possible; Playwright is given /usr/bin/chromium or AVP_CHROMIUM). Both are started on free 127.0.0.1 ports by pipeline/servers.py. Quiet when they
# are there; as root (CI) missing ones are installed with apt-get; otherwise it says how, and under CI=true a
# missing server fails.
set -euo pipefail

have_postgres() {
  if [ -n "${AVP_PG_BIN:-}" ]; then [ -x "$AVP_PG_BIN/initdb" ]; return; fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1
}

have_chromium() {
  if [ -n "${AVP_CHROMIUM:-}" ]; then [ -x "$AVP_CHROMIUM" ]; return; fi
  command -v chromium >/dev/null 2>&1
}

have_redis() {
  if [ -n "${AVP_REDIS_SERVER:-}" ]; then [ -x "$AVP_REDIS_SERVER" ]; return; fi
  command -v redis-server >/dev/null 2>&1
}

missing=()
have_postgres || missing+=(postgresql)
have_redis || missing+=(redis-server)
have_chromium || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test services: installing ${missing[*]} (apt-get install) for the registry and cluster tests"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    have_postgres && have_redis && have_chromium && exit 0
  fi
fi
msg="missing server binaries (${missing[*]}): install them with 'sudo apt-get install ${missing[*]}' or set AVP_PG_BIN / AVP_REDIS_SERVER / AVP_CHROMIUM"
if [ "${CI:-}" = "true" ]; then
  echo "test services: $msg (required in CI)" >&2
  exit 2
fi
echo "test services: $msg; the tests that need them will be skipped" >&2
