# One image for the API and the workers. The CPU torch wheel by default; for GPU workers build
# with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or your CUDA's).
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PRIMER_CACHE_DIR=/var/lib/primer
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0 && pip install .
RUN useradd --system --home /var/lib/primer primer && mkdir -p /var/lib/primer && chown primer /var/lib/primer
USER primer
EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
