"""A SparkSession configured for this pipeline (local or any master), and the environment Spark needs."""

from __future__ import annotations

import os
import sys

from pipeline.home import Home


def spark_environment() -> None:
    """Workers must run this venv's Python (else they cannot import the project) and bind to loopback."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def get_session(master: str, home: Home, app_name: str = "avp"):
    """A SparkSession. ``master`` empty means whatever ``spark-submit --master`` configured."""
    spark_environment()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    local_dir = home.spark if "://" not in home.root else "/tmp/avp-spark"
    os.makedirs(local_dir, exist_ok=True)
    os.environ.setdefault("SPARK_LOCAL_DIRS", local_dir)  # (spark.local.dir warns that the env var wins)
    builder = (builder
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.memory", os.environ.get("AVP_SPARK_DRIVER_MEMORY", "2g"))
               .config("spark.driver.host", os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"))
               .config("spark.driver.bindAddress", os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"))
               .config("spark.python.worker.reuse", "true")
               # Python workers do not import our warning filters before petastorm code runs in them.
               .config("spark.executorEnv.PYTHONWARNINGS", "ignore::FutureWarning")
               .config("spark.sql.warehouse.dir", os.path.join(local_dir, "warehouse"))
               .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={local_dir}"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
