# A hosted bcd demo: browse and diagnose only, as a non-root user, with the run store and the models
# mounted read-only. Build and run (see README, "Sharing a hosted demo"):
#   docker build -t bcd-demo .
#   docker run -p 8501:8501 --read-only --tmpfs /tmp \
#     -v "$PWD/results.db:/data/results.db:ro" -v "$PWD/artifacts:/data/artifacts:ro" bcd-demo
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN python -m pip install -r requirements.txt

# Only the code: the store, the models and any dataset come in as read-only mounts at run time.
COPY app.py ./
COPY .streamlit/config.toml .streamlit/config.toml
COPY bcd_engine bcd_engine
COPY pages pages
COPY ui ui

# The code belongs to root and cannot be changed by the user the app runs as.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin bcd
USER bcd

# Demo mode; the store is read (never migrated or written) and caches go to /tmp, because /data and
# /app are read-only. BCD_DEMO_DATASETS may name public dataset folders mounted under /data.
ENV BCD_DEMO_MODE=1 \
    BCD_DATABASE_URL=sqlite:////data/results.db \
    BCD_ARTIFACTS_DIR=/data/artifacts \
    BCD_CACHE_DIR=/tmp/bcd-cache \
    TF_CPP_MIN_LOG_LEVEL=2

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).read() != b'ok')"

CMD ["python", "-m", "streamlit", "run", "app.py", "--server.port=8501", "--server.address=0.0.0.0", \
     "--server.fileWatcherType=none"]
