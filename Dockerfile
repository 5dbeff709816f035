# One image for the registry nodes and the demo agents: `regctl` is the entrypoint.
#
# Build args (everything else is fixed, so the same file builds online and offline):
#   BASE_IMAGE  a Debian-like image with python3 (3.11+) and its venv module.
#               Default: the official slim Python image. Offline: any local image,
#               e.g. one imported from a debootstrap'd rootfs (see README).
#   WHEELS      empty (default): dependencies come from the package index.
#               A directory of the build context (e.g. "wheels", filled on the host
#               with `pip wheel`): install only from the wheels there (--no-index).
#               If it holds a raft_registry wheel (`pip wheel --no-deps .` on the
#               host, with a C compiler: the mypyc-compiled build, #24), the image
#               installs that one and needs no compiler; else it builds /src.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Marks this stage's (untagged) images, so old ones can be told apart and removed.
LABEL io.raft-registry.stage=build
ARG WHEELS=""
# pip must not try to write a cache or nag about its version inside the build.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# .dockerignore limits the context to the package sources and the wheel directory.
# Dependencies first, in their own layer, so editing the sources does not
# reinstall them.
COPY pyproject.toml /src/
COPY wheels/ /src/wheels/
# A venv, not the system site-packages: Debian's python3 refuses system-wide pip
# installs (PEP 668), and the runtime stage copies this one directory.
RUN python3 -m venv /opt/regctl \
 && if [ -n "$WHEELS" ]; then set -- --no-index --find-links "/src/$WHEELS"; else set --; fi \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /src/requirements.txt \
 && /opt/regctl/bin/pip install "$@" -r /src/requirements.txt
COPY . /src
# The package: the host's prebuilt wheel when WHEELS has one, else built from /src -- compiled with mypyc
# where this stage has a C compiler (setup.py), pure Python otherwise.  The build is printed either way.
RUN if [ -n "$WHEELS" ]; then set -- --no-index --find-links "/src/$WHEELS"; else set --; fi \
 && if [ -n "$WHEELS" ] && ls "/src/$WHEELS"/raft_registry-*.whl >/dev/null 2>&1; then \
        /opt/regctl/bin/pip install "$@" --no-deps raft-registry; \
    else \
        /opt/regctl/bin/pip install "$@" --no-deps /src; \
    fi \
 && cd / && /opt/regctl/bin/python -c 'from registry.build import build_kind; print("raft-registry build:", build_kind())' \
 && /opt/regctl/bin/pip uninstall -y pip

FROM ${BASE_IMAGE}
COPY --from=build /opt/regctl /opt/regctl
# A fixed uid/gid so volume ownership is predictable; /data is where a node keeps
# its Raft journal and snapshots, created here so a new named volume inherits the
# owner.
RUN groupadd --system --gid 10001 regctl \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin regctl \
 && mkdir -p /data \
 && chown regctl:regctl /data
ENV PATH=/opt/regctl/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER regctl
WORKDIR /data
VOLUME ["/data"]
# Client API, Raft, HTTP (/metrics, /healthz, /readyz), as docker-compose.yml uses them.
EXPOSE 7001 7101 7201 8600/tcp 8600/udp
# Liveness of a node: its HTTP port answers /healthz. python, not curl: slim images
# have no curl. REGCTL_HEALTH_URL lets the demo containers (agents) point it elsewhere.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('REGCTL_HEALTH_URL', 'http://127.0.0.1:7201/healthz'), timeout=2)"]
# Exec form: regctl is PID 1 and gets SIGTERM itself (the node stops cleanly on it).
ENTRYPOINT ["regctl"]
CMD ["--help"]
