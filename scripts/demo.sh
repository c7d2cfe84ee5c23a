#!/usr/bin/env bash
# make demo: the pipeline on the embedded default (simulated fleet logs, local Spark, SQLite registry).
set -euo pipefail
cd "$(dirname "$0")/.."
AVP=.venv/bin/avp
$AVP simulate
$AVP ingest
$AVP registry list
