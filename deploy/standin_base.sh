#!/usr/bin/env bash
# Builds a local stand-in for the Dockerfile's base image `python:3.11-slim` and tags it with that name, for
# machines that cannot pull from Docker Hub (no registry but the package indexes). It is only a stand-in:
# Debian bookworm (minbase) with Debian's python3 (3.11, as in the real base), pip, venv, `python` as a
# command, the machine's CA bundle and the machine's pip index settings, so that the Dockerfile's
# `pip install -r requirements.txt` reaches the same package index this machine uses.
#
# Usage (as root, with debootstrap and podman): deploy/standin_base.sh
# Does nothing when the image already exists (podman's store is the cache); BCD_BASE_REBUILD=1 rebuilds it.
set -euo pipefail

TAG=python:3.11-slim
PODMAN=(podman --runtime runc)

if [[ "${BCD_BASE_REBUILD:-0}" != 1 ]] && "${PODMAN[@]}" image exists "$TAG"; then
  echo "stand-in: $TAG already present"
  exit 0
fi
if [[ $EUID -ne 0 ]]; then
  echo "stand-in: debootstrap needs root (run as root, or pull the real $TAG)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "stand-in: debootstrap is missing (apt-get install -y debootstrap)" >&2; exit 1; }

# The machine's Debian mirror: the first "URIs:" (deb822) or "deb URL" entry that serves bookworm's main
# archive (not -security or -updates, not a third-party repository).
debian_mirror() {
  local file uri
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [[ -r "$file" ]] || continue
    # deb822: URIs lines; one-line format: `deb [options] URL suite ...`
    while read -r uri; do
      if [[ "$uri" =~ /debian/?$ ]]; then echo "${uri%/}"; return 0; fi
    done < <(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}
                  /^deb[ \t]/ {for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $i !~ /=/) {print $i; break}}' "$file")
  done
  echo "http://deb.debian.org/debian"
}

MIRROR=$(debian_mirror)
ROOTFS=$(mktemp -d /var/tmp/bcd-standin.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "stand-in: debootstrap bookworm from $MIRROR (a few minutes)"
# minbase has `passwd` (priority required) for the Dockerfile's useradd; named here to be sure.
debootstrap --variant=minbase \
  --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,passwd \
  bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
  tail -20 "$ROOTFS.log" >&2; echo "stand-in: debootstrap failed (log: $ROOTFS.log)" >&2; exit 1; }
rm -f "$ROOTFS.log"

# The machine's CA bundle (it may hold a local CA that the package index's TLS goes through), and the
# certificates it was built from, so that a later update-ca-certificates in the image keeps them.
BUNDLE=$(python3 - <<'PY'
import os, ssl
paths = ssl.get_default_verify_paths()
for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), paths.cafile,
                  "/etc/ssl/certs/ca-certificates.crt"):
    if candidate and os.path.isfile(candidate):
        print(candidate)
        break
PY
)
install -D -m 0644 "$BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
  cp -a /usr/local/share/ca-certificates/. "$ROOTFS/usr/local/share/ca-certificates/"
fi

# The machine's pip settings that make sense inside an image: the index (and its mirrors, proxy, trusted
# hosts, timeout), with the CA bundle at the path it was copied to. Local paths (find-links folders,
# file:// indexes, constraint files) do not exist in the image and are left out.
python3 - "$ROOTFS/etc/pip.conf" <<'PY'
import configparser, json, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in listed.splitlines():  # e.g. global.index-url='https://...' or :env:.cert='...'
    key, _, value = line.partition("=")
    scope, _, name = key.rpartition(".")
    value = value.strip().strip("'\"")
    if scope in ("global", "install", "download", ":env:"):
        settings[name] = value  # env variables come last in pip's listing and win, as in pip
keep = {}
for name in ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "default-timeout", "retries"):
    if name in settings:
        value = " ".join(v for v in settings[name].split() if not v.startswith("file:") and not v.startswith("/"))
        if value:
            keep["timeout" if name == "default-timeout" else name] = value
keep["cert"] = "/etc/ssl/certs/ca-certificates.crt"
config = configparser.ConfigParser()
config["global"] = keep
with open(sys.argv[1], "w") as out:
    out.write("# Written by deploy/standin_base.sh from this machine's pip settings (local paths left out).\n")
    config.write(out)
print("stand-in: pip settings", json.dumps(keep))
PY

# Slim the tree as the real slim image is: no package lists, no apt cache, no host identity files.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
test -x "$ROOTFS/usr/sbin/useradd" || { echo "stand-in: useradd is missing from the tree" >&2; exit 1; }
test -x "$ROOTFS/usr/bin/python" || { echo "stand-in: python is missing from the tree" >&2; exit 1; }

# The environment the real image gives, plus leave to pip-install over Debian's Python (PEP 668).
tar -C "$ROOTFS" --numeric-owner -c . | "${PODMAN[@]}" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
  --change 'CMD ["python3"]' \
  --message "bcd stand-in for python:3.11-slim (debootstrap bookworm minbase)" \
  - "localhost/$TAG" >/dev/null
# Also under the real image's full name, so that `FROM python:3.11-slim` finds it without a registry.
"${PODMAN[@]}" tag "localhost/$TAG" "docker.io/library/$TAG"
# A sandbox that cannot raise its limits refuses podman's default ulimits; ask for the ones it has.
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=32768:32768")
version=$("${PODMAN[@]}" run --rm --network none "$TAG" python --version 2>/dev/null ||
  "${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" "$TAG" python --version) ||
  { echo "stand-in: the image does not run python" >&2; exit 1; }
echo "stand-in: tagged $TAG ($version)"
