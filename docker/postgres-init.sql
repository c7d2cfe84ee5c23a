-- The avp registry's own database next to Airflow's metadata DB (POSTGRES_DB=airflow) on the compose
-- file's PostgreSQL server; make airflow-cluster creates the same two (pipeline/airflow_cluster.py).
CREATE DATABASE avp;
