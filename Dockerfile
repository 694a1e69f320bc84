# Inventiv control plane image: one image, two services (`inventiv serve api` and
# `inventiv serve orchestrator`), selected by the command. See deploy/README.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and package in one layer: uvloop, httptools, asyncpg and psutil ship wheels for
# python:3.11-slim, so no compiler is needed in the image.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

# Never run as root: the services only need their data directory.
RUN useradd --system --uid 10001 --user-group --home-dir /home/inventiv --create-home inventiv \
    && mkdir -p /data \
    && chown inventiv:inventiv /data
USER inventiv

# Inside a container each service has its own network namespace: fixed ports, no PORT_OFFSET
# (the host ports are mapped by docker-compose.yml).
ENV INVENTIV_DATA_DIR=/data \
    PORT_OFFSET=0
VOLUME ["/data"]
EXPOSE 8003 8001

CMD ["inventiv", "serve", "api", "--host", "0.0.0.0", "--port", "8003"]
