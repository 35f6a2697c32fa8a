# The cruijff worker image of docker-compose.yml (service cruijff-worker): Python 3.11 with this
# repository installed under the CPU pins, running `prefect worker start --pool cruijff`.
#   docker compose build cruijff-worker      (or: docker build -t cruijff .)
# For GPU workers, pass --build-arg TORCH_INDEX=<the PyTorch wheel index for your CUDA version>.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1

WORKDIR /opt/cruijff
# Only what the package needs (no .git, venvs, models or experiments in the image).
COPY pyproject.toml constraints-cpu.txt README.md ./
COPY cruijff ./cruijff
COPY flows ./flows
COPY deployments ./deployments
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -c constraints-cpu.txt .

WORKDIR /experiments
CMD ["prefect", "worker", "start", "--pool", "cruijff", "--type", "process"]
