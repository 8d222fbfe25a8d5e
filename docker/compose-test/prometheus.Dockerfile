# Prometheus for `make compose-test` (docker/compose-test/README.md): Debian bookworm's
# `prometheus` package (2.42) on the locally made base, since prom/prometheus:v2.55.1 cannot be
# pulled where no image registry is reachable. Laid out as the official image: the binary is the
# entrypoint (docker-compose.yml's `command:` gives its flags), /prometheus holds the data, and
# it runs as a non-root user. wget: the health check of docker-compose.yml.
ARG BASE
FROM ${BASE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus

USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
