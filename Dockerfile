# lesionlapse container: docker build -t lesionlapse . && docker run --rm -u $(id -u):$(id -g) \
#   -v /data/bids:/data:ro -v /data/out:/out lesionlapse /data /out participant
FROM python:3.11-slim

# No telemetry or network at run time; thread counts can be overridden with -e.
ENV NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/lesionlapse
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY configs ./configs
COPY pipeline ./pipeline
COPY sample_data ./sample_data

# Same install script as `make demo` / `make test` (and so CI), without the test extras.
RUN PYTHON=python3 sh scripts/install.sh /opt/venv \
    && chmod -R a+rX /opt/lesionlapse /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# A non-root default user; HOME=/tmp keeps the image usable under any `docker run -u UID`.
RUN useradd --no-create-home --uid 1000 --shell /usr/sbin/nologin lesionlapse
USER lesionlapse
WORKDIR /tmp

ENTRYPOINT ["lesionlapse"]
CMD ["--help"]
