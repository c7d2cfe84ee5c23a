#!/usr/bin/env bash
# make airflow-cluster: Airflow with the CeleryExecutor on this machine (pipeline/airflow_cluster.py):
# PostgreSQL (metadata DB + avp registry), Redis, api-server, scheduler, dag-processor, triggerer, a general
# Celery worker and one on the `training` queue. State and logs under $AVP_HOME/cluster; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export AVP_HOME=${AVP_HOME:-$PWD/.avp}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$AVP_HOME/cluster/airflow}
source scripts/airflow_env.sh
# A single local user: every visitor is admin. Fine on 127.0.0.1; use a real auth manager elsewhere.
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}
exec python -m pipeline.airflow_cluster
