# One image for every process of the deployment: the worker, beat and Flower
# (docker-compose.yml picks the command; the default is a worker on all
# three queues). Configuration comes only from ADAPTIVE_ variables.
#
# Two stages: the build stage has uv and the lock file and produces a venv
# in /opt/venv; the final image is that venv on python:3.11-slim, run as an
# unprivileged user, with neither uv nor the sources' tests in it.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

# uv from PyPI, pinned so a rebuild resolves the lock file the same way.
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

# Bytecode compiled at build time (the runtime user cannot write it), no
# interpreter downloads (the image's Python is the one), the venv at a path
# that stays the same in the final stage (its scripts' shebangs point there).
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /src

# Dependencies first: this layer is reused until pyproject.toml or uv.lock
# change. --locked fails the build if the lock file is out of date.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project

# Then the project itself, installed into site-packages (not editable), so
# the final stage needs no source tree.
COPY README.md ./
COPY storage ./storage
COPY tasks ./tasks
COPY worker ./worker
RUN uv sync --locked --no-dev --no-editable


FROM ${PYTHON_IMAGE}

# A fixed numeric uid/gid, so orchestrators can verify "not root". The
# state directory (beat's schedule; compose mounts a volume there) belongs to
# that user: an empty named volume takes the ownership of the image's
# directory, and a root-owned one would stop beat from saving its schedule.
RUN groupadd --system --gid 10001 adaptive \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/adaptive \
        --shell /usr/sbin/nologin adaptive \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/adaptive-worker

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# No .env in here (.dockerignore): settings come from the environment.
WORKDIR /home/adaptive
USER 10001:10001

# 9808: the worker's Prometheus /metrics; 5555: Flower.
EXPOSE 9808 5555

CMD ["celery", "-A", "worker", "worker", "-Q", "adaptive.ingest,adaptive.learn,adaptive.maintenance", "-E", "--loglevel=INFO"]
