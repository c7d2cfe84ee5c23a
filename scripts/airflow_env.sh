# Source me: the Airflow environment for this repo (SQLite metadata DB in the pipeline home).
#   source scripts/airflow_env.sh
_avp_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export AVP_HOME=${AVP_HOME:-$_avp_root/.avp}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$AVP_HOME/airflow}
export AIRFLOW__CORE__DAGS_FOLDER=${AIRFLOW__CORE__DAGS_FOLDER:-$_avp_root/dags}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# the registry plugin (API and pages at /avp, "Registry" in the navigation): pipeline/airflow_plugins/avp_registry.py
export AIRFLOW__CORE__PLUGINS_FOLDER=${AIRFLOW__CORE__PLUGINS_FOLDER:-$_avp_root/pipeline/airflow_plugins}
# A trigger's conf sets the DAG's declared params (pipeline.orchestration refuses any other key).
export AIRFLOW__CORE__DAG_RUN_CONF_OVERRIDES_PARAMS=True
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}   # default 32 spawns 32 workers (5.6 GB)
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}
export AIRFLOW__API__HOST=${AIRFLOW__API__HOST:-127.0.0.1}
export AIRFLOW__API__PORT=${AIRFLOW__API__PORT:-8080}
# task processes report to the API server's execution API: it must follow the host/port above
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT/execution/}
export PYSPARK_PYTHON=$_avp_root/.venv/bin/python SPARK_LOCAL_IP=127.0.0.1
export PATH=$_avp_root/.venv/bin:$PATH
mkdir -p "$AIRFLOW_HOME"
