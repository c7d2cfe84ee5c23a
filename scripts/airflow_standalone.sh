#!/usr/bin/env bash
# make airflow: `airflow standalone` (scheduler, API server and UI on http://127.0.0.1:8080) with the
# avp_daily DAG. Ctrl-C (SIGINT) stops every component cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/airflow_env.sh
# A single local user: every visitor is admin. Fine on 127.0.0.1; use a real auth manager elsewhere.
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}
airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
airflow pools set avp_training 1 "one training at a time" >/dev/null
echo "Airflow UI: http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT  (DAG avp_daily; Ctrl-C to stop)"
exec airflow standalone
