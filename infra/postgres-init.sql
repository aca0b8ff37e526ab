-- Run once by the postgres image on an empty volume (as POSTGRES_USER): MLflow's database is
-- POSTGRES_DB (mlflow); Prefect's is this one.
CREATE DATABASE prefect;
