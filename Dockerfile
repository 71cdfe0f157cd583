# MangoGram broker image: `docker compose up` runs it with the mangogram-data volume at /data.
# (/cluster-key is where the compose file's cluster profile mounts the key pair its brokers
# share; a named volume mounted there starts owned by the broker's user, as /data does.)
#
# The broker listens on tcp://0.0.0.0:5555 inside the container and keeps its user directory
# in /data. Every broker flag also reads a MANGOGRAM_* variable (`python broker.py --help`),
# so set them with `docker run -e` or compose's `environment:`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric id, so `runAsNonRoot` checks and host bind mounts can rely on it.
RUN groupadd --system --gid 10001 mangogram \
    && useradd --system --uid 10001 --gid mangogram --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mangogram \
    && mkdir -p /data /cluster-key \
    && chown mangogram:mangogram /data /cluster-key

WORKDIR /app

# .dockerignore lets in only the project's sources, so the context stays small and clean.
COPY . .

# The code stays owned by root: the broker may write to /data only. The `cluster` extra
# (nats-py) lets the same image run as a cluster broker (--nats, docs/cluster.md).
RUN pip install --no-cache-dir "./[cluster]" \
    && rm -rf build ./*.egg-info

ENV MANGOGRAM_BIND=tcp://0.0.0.0:5555 \
    MANGOGRAM_KEY_BIND=tcp://0.0.0.0:5556 \
    MANGOGRAM_DATA=/data \
    MANGOGRAM_LOG_LEVEL=INFO

VOLUME ["/data"]
EXPOSE 5555 5556
USER 10001:10001

# Alive means answering: the broker's plaintext key-discovery port returns its public key
# (the chat port speaks only CurveZMQ). Any reply within 3 s passes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,sys,zmq; s=zmq.Context().socket(zmq.DEALER); s.linger=0; s.connect(os.environ['MANGOGRAM_KEY_BIND'].replace('0.0.0.0','127.0.0.1')); s.send_multipart([b'MGK01',b'KEY']); r=s.poll(3000); s.close(); sys.exit(0 if r else 1)"]

# Exec form: python is PID 1 and gets SIGTERM itself; the broker stops cleanly on it.
CMD ["python", "broker.py"]
