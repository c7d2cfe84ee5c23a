"""docker/compose.yaml must describe the deployment `make airflow-cluster` runs (pipeline/airflow_cluster.py):
the same processes, queues, settings and databases, on the images the Dockerfiles build. No container engine
runs here, so the file is parsed and checked against the code, the scripts and the Dockerfiles."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import airflow_cluster as cluster

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
COMPONENTS = {f"airflow-{c.name}": c for c in cluster.components(Path("/tmp/unused"), "host")}
AIRFLOW_SERVICES = ["airflow-init", *COMPONENTS]
SPARK_SERVICES = ["spark-master", "spark-worker"]


def dockerfile_env(name: str) -> dict[str, str]:
    """The ENV settings of docker/<name>.Dockerfile (KEY=value pairs, continuation lines joined)."""
    text = (REPO / "docker" / f"{name}.Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def env_of(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service]["environment"].items()}


def test_services_are_the_cluster_processes_plus_servers_and_spark():
    assert set(SERVICES) == {"postgres", "redis", *AIRFLOW_SERVICES, *SPARK_SERVICES}
    # one Airflow service per process make airflow-cluster starts, with the same command line (on its own host,
    # without the pid file that several workers on one machine need)
    for service in COMPONENTS:
        [local] = [c for c in cluster.components(Path("/tmp/unused"), SERVICES[service]["hostname"])
                   if f"airflow-{c.name}" == service]
        args = local.args[:local.args.index("--pid")] if "--pid" in local.args else local.args
        assert SERVICES[service]["command"] == ["airflow", *args], service


@pytest.mark.parametrize("service", ["airflow-worker", "airflow-training-worker"])
def test_workers_listen_on_the_queues_the_cluster_uses(service):
    command = SERVICES[service]["command"]
    component = COMPONENTS[service]
    for flag in ("--queues", "--concurrency"):
        assert command[command.index(flag) + 1] == component.args[component.args.index(flag) + 1]
    node = command[command.index("--celery-hostname") + 1]
    assert node in SERVICES[service]["healthcheck"]["test"]  # the health check pings this very node
    assert env_of(service)["AVP_TRAINING_QUEUE"] == cluster.TRAINING_QUEUE
    assert COMPONENTS["airflow-training-worker"].args[COMPONENTS["airflow-training-worker"].args.index("--queues") + 1] \
        == cluster.TRAINING_QUEUE


def test_images_come_from_the_dockerfiles():
    for names, image, dockerfile in ((AIRFLOW_SERVICES, "avp-airflow", "airflow"),
                                     (SPARK_SERVICES, "avp-training", "training")):
        text = (REPO / "docker" / f"{dockerfile}.Dockerfile").read_text()
        assert f"-f docker/{dockerfile}.Dockerfile -t {image} ." in text  # the tag the Dockerfile documents
        for name in names:
            assert SERVICES[name]["image"] == image
            assert SERVICES[name]["build"] == {"context": "..", "dockerfile": f"docker/{dockerfile}.Dockerfile"}
            assert (REPO / "docker" / SERVICES[name]["build"]["context"] / SERVICES[name]["build"]["dockerfile"]).exists()


def test_airflow_env_is_the_cluster_env():
    env = env_of("airflow-scheduler")
    expected = cluster.cluster_env({}, env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__CELERY__BROKER_URL"],
                                   env["AVP_REGISTRY_URL"])
    for key, value in expected.items():
        if key in cluster.ONE_MACHINE_ONLY:
            assert key not in env
        else:
            assert env.get(key) == value, key
    for key in cluster.SHARED_SECRETS:  # from the operator's environment, required
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[key]), key
    # the Airflow services all share it (the api-server adds only where it listens)
    for service in AIRFLOW_SERVICES:
        extra = set(env_of(service)) - set(env)
        assert extra <= {"AIRFLOW__API__HOST", "AIRFLOW__API__PORT", "SPARK_LOCAL_IP"}, (service, extra)
        assert all(env_of(service)[k] == v for k, v in env.items()), service
    # settings the local scripts and the image agree on
    image = dockerfile_env("airflow")
    assert env["AIRFLOW__CORE__PARALLELISM"] == image["AIRFLOW__CORE__PARALLELISM"]
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"
    airflow_env_sh = (REPO / "scripts" / "airflow_env.sh").read_text()
    assert "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False" in airflow_env_sh


def test_databases_broker_and_spark_connection_point_at_the_services():
    env = env_of("airflow-scheduler")
    postgres = SERVICES["postgres"]["environment"]
    host_db = re.compile(r"postgresql\+psycopg://(\w+):\$\{AVP_DB_PASSWORD:\?[^}]+\}@postgres:5432/(\w+)")
    user, database = host_db.fullmatch(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).groups()
    assert (user, database) == (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]) == (user, cluster.AIRFLOW_DB)
    user, database = host_db.fullmatch(env["AVP_REGISTRY_URL"]).groups()
    assert (user, database) == (postgres["POSTGRES_USER"], cluster.REGISTRY_DB)
    assert env_of("spark-master")["AVP_REGISTRY_URL"] == env["AVP_REGISTRY_URL"]
    init = next(v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    sql = (REPO / "docker" / init.split(":")[0]).read_text()
    assert f"CREATE DATABASE {cluster.REGISTRY_DB};" in sql
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
    # the api-server publishes what the execution API URL names
    api = SERVICES["airflow-api-server"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
        f"http://{api['hostname']}:{env_of('airflow-api-server')['AIRFLOW__API__PORT']}/execution/"
    assert "EXPOSE 8080" in (REPO / "docker" / "airflow.Dockerfile").read_text()
    # ingest's Spark connection names the master service and the port it listens on
    conn = env["AVP_SPARK_CONN_ID"]
    master = env[f"AIRFLOW_CONN_{conn.upper()}"]
    command = SERVICES["spark-master"]["command"]
    assert master == f"spark://{command[command.index('--host') + 1]}:{command[command.index('--port') + 1]}"
    assert master in SERVICES["spark-worker"]["command"]
    for service in ("airflow-worker", "airflow-training-worker", *SPARK_SERVICES):
        assert env_of(service)["SPARK_LOCAL_IP"] == SERVICES[service]["hostname"]  # reachable, not 127.0.0.1


def test_every_host_mounts_the_shared_home_at_avp_home():
    for service in [*AIRFLOW_SERVICES, *SPARK_SERVICES]:
        home = env_of(service)["AVP_HOME"]
        dockerfile = "training" if service in SPARK_SERVICES else "airflow"
        assert home == dockerfile_env(dockerfile)["AVP_HOME"]
        assert f"avp-home:{home}" in SERVICES[service]["volumes"], service
    assert "avp-home" in COMPOSE["volumes"]


def test_long_running_services_have_healthchecks_and_wait_for_their_servers():
    for name, service in SERVICES.items():
        if name == "airflow-init":
            assert service["restart"] == "no"
            continue
        assert service["healthcheck"]["test"][0] == "CMD", name
    for service in COMPONENTS:
        depends = SERVICES[service]["depends_on"]
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"
        assert depends["airflow-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["spark-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"
    init = " ".join(SERVICES["airflow-init"]["command"])
    assert "airflow db migrate" in init and f"airflow pools set {cluster.TRAINING_POOL[0]} {cluster.TRAINING_POOL[1]}" in init
