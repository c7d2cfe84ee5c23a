#!/usr/bin/env bash
# make demo: the whole pipeline on the embedded default - simulated fleet logs, local Spark, SQLite registry,
# local training processes - run by the real Airflow DAG (`airflow dags test`, SQLite metadata DB in the home).
#   DEMO_DAY=2026-11-04   the logical date the DAG runs at (its dataset holds every log recorded before it)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/airflow_env.sh
DEMO_DAY=${DEMO_DAY:-2026-11-04}
started=$(date +%s)

echo "== 1. simulate three days of fleet drive logs into $AVP_HOME/logs"
avp simulate

echo "== 2. Airflow metadata DB and the training pool (in $AIRFLOW_HOME)"
airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
airflow pools set avp_training 1 "one training at a time" >/dev/null

echo "== 3. run the avp_daily DAG for $DEMO_DAY: ingest -> validate -> train -> evaluate -> serve -> promote"
set +e
# auto_promote: no one is at the UI to approve the package (make airflow shows the approval step)
airflow dags test avp_daily "$DEMO_DAY" --conf '{"auto_promote": true}' 2>&1 | tee "$AVP_HOME/demo-dag.log" |
  grep --line-buffered -vE "^\s*$|\[(info|debug|warning)\s*\]|^\s*(at |File )|WARN |Traceback" | cut -c1-200
dag_status=${PIPESTATUS[0]}
set -e
if [ "$dag_status" != 0 ]; then
  echo "the DAG run failed (exit $dag_status); full log: $AVP_HOME/demo-dag.log" >&2
  exit 1
fi

echo "== 4. what was made"
avp registry list
avp registry lineage package:bev_segnet
DATASET=$(avp registry show dataset:fleet-lidar | python -c 'import json,sys; print(json.load(sys.stdin)["locations"][0])')
REPORT=$(avp registry show validation:fleet-lidar | python -c 'import json,sys; print(json.load(sys.stdin)["locations"][0])')
METRICS=$(avp registry show metrics:bev_segnet | python -c 'import json,sys; print(json.load(sys.stdin)["locations"][0])')
PACKAGE=$(ls -d "$(avp registry show package:bev_segnet | python -c 'import json,sys; print(json.load(sys.stdin)["locations"][0])')"/bev_segnet-v*/ | head -1)
cat <<DONE

Done in $(( $(date +%s) - started )) s.
  dataset            $DATASET
  validation report  $REPORT/report.html
  evaluation report  $METRICS/report.html
  serving package    $PACKAGE
Next: serving/cpp/build.sh && serving/cpp/build/avp_consumer $PACKAGE
      avp serve-http --package $PACKAGE
      make airflow   (the UI on http://127.0.0.1:8080, with this DAG)
DONE
