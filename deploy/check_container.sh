#!/usr/bin/env bash
# The hosted demo's container, for real: build the project's Dockerfile, serve a run shipped as a bundle
# from a fresh store, upload an image in a real browser and read the answer.
#
#   deploy/check_container.sh            (as root, from anywhere; see deploy/README.md)
#
# Steps:
#   1. podman can start containers here (with explicit ulimits where this machine cannot raise its own);
#      the base image python:3.11-slim is present, or a local stand-in is built (deploy/standin_base.sh).
#   2. `podman build` of the Dockerfile as users build it with docker (timed: the build time).
#   3. A "lab" store (temporary): a backbone trained from a LOCAL weights file, which is then deleted; the
#      run is exported as a bundle (`export --format bundle`) and imported (`import`) into a fresh "served"
#      store that holds nothing but results.db and artifacts/.
#   4. The image runs as the Dockerfile's header says: --read-only --tmpfs /tmp, the store and the models
#      mounted read-only; wait for /_stcore/health to say ok (timed: start to healthy).
#   5. Headless Chromium opens Diagnose, uploads an image of the lab's dataset and reads the answer
#      (timed: upload to answer); an error box, "cannot be loaded", an exception or no answer fails.
#   6. Nothing was written in the container outside /tmp (`podman diff`) and the mounted store files'
#      sha256 are unchanged.
#
# Environment (all optional):
#   BCD_CHECK_DATA=DIR        train on this dataset (class subfolders) instead of a synthetic one
#   BCD_CHECK_WEIGHTS=FILE    the local no-top .weights.h5 to train from (copied first: only the copy is
#                             deleted); default: a randomly initialised MobileNetV2 saved to a file
#   BCD_CHECK_BACKBONE=NAME   backbone of the weights (default mobilenetv2, or guessed from FILE's name)
#   BCD_CHECK_TRAIN_ARGS=...  extra `train` options (default: --image-size 64 --epochs 2 --batch-size 16
#                             --augment 1)
#   BCD_CHECK_IMAGE=NAME      image tag (default bcd-demo)
#   BCD_CHECK_HEALTH_TIMEOUT  seconds to wait for the health check (default 300)
#   BCD_CHECK_ANSWER_TIMEOUT  seconds to wait for each browser step (default 300)
#   BCD_CHECK_KEEP=1          keep the temporary folder (stores, logs, screenshot) and say where
#   PYTHON                    the host's Python with the project's requirements and playwright (python3)
#
# Exits 0 after printing the three timings; otherwise 1 with one line "check_container: FAILED: <reason>".
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$DEPLOY")
IMAGE=${BCD_CHECK_IMAGE:-bcd-demo}
BASE=python:3.11-slim
PYTHON=${PYTHON:-python3}
HEALTH_TIMEOUT=${BCD_CHECK_HEALTH_TIMEOUT:-300}
ANSWER_TIMEOUT=${BCD_CHECK_ANSWER_TIMEOUT:-300}
PODMAN=(podman --runtime runc)
LIMITS=()        # --ulimit options, where this machine needs them (step 1)
CONTAINER=""     # the container's id once it runs
TWIN=""          # the id of its twin that only runs `true` (step 6)
WORK=""          # the temporary folder

say() { echo "check_container: $*"; }
fail() {
  echo "check_container: FAILED: $*" >&2
  exit 1
}
now() { echo "$EPOCHREALTIME"; }
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# The engine's CLI on the host with the store in folder $1 and caches in $2, quiet about TensorFlow.
store_bcd() {
  local store=$1 cache=$2
  shift 2
  (cd "$ROOT" && BCD_DATABASE_URL="sqlite:///$store/results.db" BCD_ARTIFACTS_DIR="$store/artifacts" \
    BCD_CACHE_DIR="$cache" TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" -m bcd_engine "$@")
}
# The value of a key in a JSON document on stdin (first element of a list).
json_get() { "$PYTHON" -c 'import json, sys
value = json.load(sys.stdin)[sys.argv[1]]
print(value[0] if isinstance(value, list) else value)' "$1"; }

cleanup() {
  local status=$?
  if [[ -n "$CONTAINER" ]]; then
    if [[ $status -ne 0 && -n "$WORK" ]]; then  # the server's last words, for the failure's reason
      "${PODMAN[@]}" logs "$CONTAINER" >"$WORK/container.log" 2>&1 || true
      echo "--- last lines of the container's log:" >&2
      tail -15 "$WORK/container.log" >&2 || true
    fi
    "${PODMAN[@]}" rm -f -t 5 "$CONTAINER" >/dev/null 2>&1 || true
  fi
  [[ -z "$TWIN" ]] || "${PODMAN[@]}" rm -f "$TWIN" >/dev/null 2>&1 || true
  if [[ -n "$WORK" ]]; then
    if [[ "${BCD_CHECK_KEEP:-0}" == 1 ]]; then
      echo "check_container: kept $WORK" >&2
    else
      rm -rf "$WORK"
    fi
  fi
}
trap cleanup EXIT
# A command that fails where no step expected it still ends with one line that says which.
trap 'fail "line $LINENO: \"$BASH_COMMAND\" exited with status $?"' ERR
trap 'exit 130' INT TERM

# --- 0. Tools -------------------------------------------------------------------------------------------
for tool in podman runc curl sha256sum "$PYTHON"; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install -y podman runc curl)"
done
[[ -x /usr/bin/chromium ]] || fail "/usr/bin/chromium is missing (apt-get install -y chromium)"
(cd "$ROOT" && "$PYTHON" -c 'import tensorflow, streamlit, playwright, bcd_engine' 2>/dev/null) ||
  fail "$PYTHON cannot import tensorflow, streamlit, playwright and bcd_engine (pip install -r requirements-dev.txt)"
WORK=$(mktemp -d /tmp/bcd-check.XXXXXX)
chmod 755 "$WORK"

# --- 1. The base image and podman's limits --------------------------------------------------------------
if ! "${PODMAN[@]}" image exists "$BASE"; then
  say "$BASE is not here and cannot be pulled: building the local stand-in (deploy/standin_base.sh)"
  "$DEPLOY/standin_base.sh" || fail "the stand-in for $BASE could not be built"
fi
# Podman asks runc for its default ulimits (1048576 open files); a sandbox without the power to raise
# its limits refuses those, so ask for the limits this shell already has where the defaults fail.
if ! "${PODMAN[@]}" run --rm --network none "$BASE" true >/dev/null 2>"$WORK/probe.log"; then
  LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=32768:32768")
  "${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" "$BASE" true >/dev/null 2>"$WORK/probe.log" ||
    fail "podman cannot start a container: $(tail -1 "$WORK/probe.log")"
  say "podman's default ulimits are refused here: running with ${LIMITS[*]}"
fi

# --- 2. Build -------------------------------------------------------------------------------------------
say "building $IMAGE from $ROOT/Dockerfile (the first build installs requirements.txt: many minutes)"
started=$(now)
"${PODMAN[@]}" build --format docker "${LIMITS[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || {
  tail -20 "$WORK/build.log" >&2
  fail "podman build failed (last lines above)"
}
BUILD_S=$(seconds_since "$started")
steps=$(grep -E '^STEP ' "$WORK/build.log" | grep -vc ': FROM ' || true)  # FROM is never "from cache"
cached=$(grep -c '^--> Using cache' "$WORK/build.log" || true)
BUILD_NOTE="$cached of $steps steps from podman's layer cache"
say "built in ${BUILD_S} s ($BUILD_NOTE)"

# --- 3. A run trained from a local weights file that is then deleted, shipped as a bundle ----------------
LAB=$WORK/lab
SERVED=$WORK/store
mkdir -p "$LAB" "$SERVED"
lab_bcd() { store_bcd "$LAB" "$LAB/cache" "$@"; }
WEIGHTS=$LAB/backbone.weights.h5
if [[ -n "${BCD_CHECK_DATA:-}" ]]; then
  DATA=$(cd "$BCD_CHECK_DATA" 2>/dev/null && pwd) || fail "BCD_CHECK_DATA is not a folder: $BCD_CHECK_DATA"
else
  DATA=$LAB/data
  (cd "$ROOT" && "$PYTHON" -c 'import sys
from bcd_engine.data.synthetic import make_synthetic_dataset
make_synthetic_dataset(sys.argv[1], n_per_class=30, image_size=64, seed=0)' "$DATA") ||
    fail "the synthetic dataset could not be drawn"
fi
if [[ -n "${BCD_CHECK_WEIGHTS:-}" ]]; then
  [[ -f "$BCD_CHECK_WEIGHTS" ]] || fail "BCD_CHECK_WEIGHTS is not a file: $BCD_CHECK_WEIGHTS"
  cp "$BCD_CHECK_WEIGHTS" "$WEIGHTS"  # the copy is what gets deleted
  # The backbone named in the file's name (resnet50_imagenet_notop.weights.h5: resnet50), longest name first.
  BACKBONE=${BCD_CHECK_BACKBONE:-$(cd "$ROOT" && "$PYTHON" -c 'import re, sys
from bcd_engine.models.backbones import BACKBONES
name = re.sub("[^a-z0-9]", "", sys.argv[1].lower())
print(next((b for b in sorted(BACKBONES, key=len, reverse=True) if b in name), ""))' "$(basename "$BCD_CHECK_WEIGHTS")")}
  [[ -n "$BACKBONE" ]] || fail "set BCD_CHECK_BACKBONE to the backbone of $BCD_CHECK_WEIGHTS"
else
  BACKBONE=${BCD_CHECK_BACKBONE:-mobilenetv2}
  [[ "$BACKBONE" == mobilenetv2 ]] || fail "without BCD_CHECK_WEIGHTS the weights file is a MobileNetV2's"
  (cd "$ROOT" && TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" -c 'import sys, keras
keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3)).save_weights(sys.argv[1])' \
    "$WEIGHTS" 2>"$LAB/weights.log") || fail "the MobileNetV2 weights file could not be written: $(tail -1 "$LAB/weights.log")"
fi
read -r -a TRAIN_ARGS <<<"${BCD_CHECK_TRAIN_ARGS:---image-size 64 --epochs 2 --batch-size 16 --augment 1}"
say "lab: training $BACKBONE from the local weights file $(basename "$WEIGHTS") on $DATA"
lab_bcd train --json --data "$DATA" --backbone "$BACKBONE" --weights "$WEIGHTS" "${TRAIN_ARGS[@]}" \
  >"$LAB/train.json" 2>"$LAB/train.log" ||
  fail "lab training failed: $(grep -v '^\s*$' "$LAB/train.log" | tail -1)"
LAB_RUN=$(json_get run_id <"$LAB/train.json")
rm "$WEIGHTS"  # from now on the run must stand on its own
say "lab: run $LAB_RUN trained; its weights file deleted"
lab_bcd export --json --run "$LAB_RUN" --format bundle --out "$LAB/bundle" >"$LAB/export.json" 2>"$LAB/export.log" ||
  fail "export of the bundle failed: $(grep -v '^\s*$' "$LAB/export.log" | tail -1)"
BUNDLE=$(json_get files <"$LAB/export.json")
store_bcd "$SERVED" "$WORK/import-cache" import --json "$BUNDLE" >"$WORK/import.json" 2>"$WORK/import.log" ||
  fail "import of the bundle failed: $(grep -v '^\s*$' "$WORK/import.log" | tail -1)"
SERVED_RUN=$(json_get run_id <"$WORK/import.json")
say "served store: run $SERVED_RUN imported from $(basename "$BUNDLE") ($(du -h "$BUNDLE" | cut -f1))"
extra=$(find "$SERVED" -mindepth 1 -maxdepth 1 ! -name results.db ! -name artifacts -printf '%f ')
[[ -z "$extra" ]] || fail "the served store holds more than results.db and artifacts/: $extra"
chmod -R a+rX "$SERVED"  # the container's user (uid 10001) reads it
(cd "$SERVED" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/store.sha256"
# An image of the run's own dataset, the first of the first class: one the model answers for.
UPLOAD=$(find "$DATA" -mindepth 2 -maxdepth 2 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \
  -o -iname '*.bmp' -o -iname '*.tif' -o -iname '*.tiff' \) | sort | sed -n 1p)  # not head: SIGPIPE
[[ -n "$UPLOAD" ]] || fail "no image found in $DATA"

# --- 4. Run as the README says; wait for the health check -----------------------------------------------
PORT=$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# --read-only-tmpfs=false: podman's --read-only would also mount /var/tmp and /run writable; docker's
# --read-only leaves only what --tmpfs names, which is what the README promises.
started=$(now)
CONTAINER=$("${PODMAN[@]}" run -d "${LIMITS[@]}" -p "127.0.0.1:$PORT:8501" --read-only --read-only-tmpfs=false \
  --tmpfs /tmp -v "$SERVED/results.db:/data/results.db:ro" -v "$SERVED/artifacts:/data/artifacts:ro" \
  "$IMAGE" 2>"$WORK/run.log") || fail "podman run failed: $(tail -1 "$WORK/run.log")"
URL=http://127.0.0.1:$PORT
deadline=$((SECONDS + HEALTH_TIMEOUT))
until [[ "$(curl -fsS --max-time 2 "$URL/_stcore/health" 2>/dev/null)" == ok ]]; do
  [[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" == true ]] ||
    fail "the container stopped before it was healthy"
  ((SECONDS < deadline)) || fail "no 'ok' from $URL/_stcore/health within ${HEALTH_TIMEOUT} s"
  sleep 0.25
done
HEALTHY_S=$(seconds_since "$started")
say "healthy after ${HEALTHY_S} s at $URL"

# --- 5. Diagnose in a real browser ----------------------------------------------------------------------
say "browser: uploading $(basename "$UPLOAD") on the Diagnose page"
"$PYTHON" "$DEPLOY/container_browser.py" --url "$URL" --image "$UPLOAD" --timeout "$ANSWER_TIMEOUT" \
  --shot "$WORK/diagnose.png" >"$WORK/answer.json" 2>"$WORK/browser.log" ||
  fail "$(grep -v '^\s*$' "$WORK/browser.log" | tail -1)"
ANSWER_S=$(json_get seconds <"$WORK/answer.json")
ANSWER=$(json_get answer <"$WORK/answer.json")
CONFIDENCE=$(json_get confidence <"$WORK/answer.json")
READING=$(json_get reading <"$WORK/answer.json")
RUN_LABEL=$(json_get run <"$WORK/answer.json")
[[ -n "$ANSWER" ]] || fail "the Diagnose page showed an empty answer"

# --- 6. Nothing written outside /tmp; the store unchanged -----------------------------------------------
# The runtime itself leaves empty mount points in the container's layer (/data/..., /etc's hosts, hostname
# and mtab, /run/.containerenv), which `podman diff` shows as "A /data" and "C /etc". A twin container with
# the same image, flags and mounts that only runs `true` shows exactly those: the served container's diff
# must add nothing to the twin's, except under /tmp.
"${PODMAN[@]}" diff "$CONTAINER" >"$WORK/diff.txt" 2>&1 || fail "podman diff failed: $(tail -1 "$WORK/diff.txt")"
TWIN=$("${PODMAN[@]}" run -d "${LIMITS[@]}" --read-only --read-only-tmpfs=false --tmpfs /tmp --network none \
  -v "$SERVED/results.db:/data/results.db:ro" -v "$SERVED/artifacts:/data/artifacts:ro" "$IMAGE" true \
  2>"$WORK/twin.log") || fail "the twin container did not run: $(tail -1 "$WORK/twin.log")"
"${PODMAN[@]}" wait "$TWIN" >/dev/null 2>&1 || true
"${PODMAN[@]}" diff "$TWIN" >"$WORK/twin-diff.txt" 2>&1 || fail "podman diff of the twin failed"
"${PODMAN[@]}" rm -f "$TWIN" >/dev/null 2>&1 || true
TWIN=""
outside=$(grep -vxF -f "$WORK/twin-diff.txt" "$WORK/diff.txt" | awk '$2 != "/tmp" && $2 !~ /^\/tmp\//' |
  tr '\n' ' ' || true)
[[ -z "$outside" ]] || fail "the container wrote outside /tmp: $outside"
(cd "$SERVED" && sha256sum --quiet -c "$WORK/store.sha256" >/dev/null 2>&1) ||
  fail "the mounted store files changed (sha256)"
extra=$(find "$SERVED" -mindepth 1 -maxdepth 1 ! -name results.db ! -name artifacts -printf '%f ')
[[ -z "$extra" ]] || fail "files appeared beside the mounted store: $extra"

"${PODMAN[@]}" stop -t 10 "$CONTAINER" >/dev/null 2>&1 || true
"${PODMAN[@]}" rm -f "$CONTAINER" >/dev/null 2>&1 || fail "could not remove the container $CONTAINER"
CONTAINER=""

echo
echo "container check passed: $IMAGE served a bundled run read-only and answered in a real browser"
echo "  run served:            run $SERVED_RUN of the served store (\"$RUN_LABEL\"), imported from"
echo "                         $(basename "$BUNDLE"): lab run $LAB_RUN, $BACKBONE trained from a local weights file, deleted"
echo "  answer:                $ANSWER ($CONFIDENCE) for $(basename "$UPLOAD"): $READING"
echo "  writes outside /tmp:   none (podman diff: $(wc -l <"$WORK/twin-diff.txt") runtime mount points, as a twin running \`true\`)"
echo "  mounted store:         unchanged (sha256 of $(wc -l <"$WORK/store.sha256") files)"
echo "  build time:            ${BUILD_S} s ($BUILD_NOTE)"
echo "  start-to-healthy time: ${HEALTHY_S} s"
echo "  upload-to-answer time: ${ANSWER_S} s"
