# GPU image for k8s/rayservice.yaml (head and workers run the same image).
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY hiresfix ./hiresfix
COPY deployments ./deployments
COPY serve_config.yaml ./
RUN pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
