# Airflow image: scheduler, API server and workers for the avp_daily DAG. Tasks call the same stage entry
# functions as the CLI, so the image carries the whole pipeline.
# It installs through scripts/setup.sh, the same path as `make setup`: torch==2.13.0 first, then
# requirements.txt under constraints.txt, then horovod==0.28.1 built from its sdist with the C++17 fix.
# Build from the repo root:  docker build -f docker/airflow.Dockerfile -t avp-airflow .
# For GPUs, start FROM an nvidia/cuda image with Python 3.11: the same torch pin resolves to the CUDA build.
FROM python:3.11-slim-bookworm

RUN apt-get update && apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless g++ cmake make git procps \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 AVP_VENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PYSPARK_PYTHON=/opt/venv/bin/python SPARK_LOCAL_IP=127.0.0.1 AVP_HOME=/data/avp \
    AIRFLOW_HOME=/opt/airflow AIRFLOW__CORE__DAGS_FOLDER=/opt/avp/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/avp/pipeline/airflow_plugins \
    AIRFLOW__CORE__PARALLELISM=4 \
    AVP_CACHE_DIR=/tmp/avp-cache
WORKDIR /opt/avp
# Dependencies first, in their own layer, so code changes do not reinstall them.
COPY requirements.txt constraints.txt pyproject.toml ./
COPY scripts/setup.sh scripts/setup.sh
RUN AVP_SETUP_DEPS_ONLY=1 bash scripts/setup.sh && rm -rf /tmp/avp-cache
COPY . .
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation -e .
EXPOSE 8080
CMD ["airflow", "standalone"]
