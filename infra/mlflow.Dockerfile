# The MLflow tracking server + registry of infra/docker-compose.yml: the pinned MLflow with the
# PostgreSQL driver (backend store) and boto3 (S3/MinIO artifact store). Build from the project root.
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 mlflow
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt mlflow 'psycopg[binary]' boto3
USER mlflow
EXPOSE 5000
