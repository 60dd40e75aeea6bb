# shellcheck shell=bash
# Sourced by scripts/demo and scripts/test-all: the host setup they share.
# Everything here is idempotent: a second run installs nothing and finishes in seconds.

# The virtualenv the scripts install into; VENV=/elsewhere keeps a developer's .venv as it is.
VENV="${VENV:-.venv}"
case "$VENV" in
/*) ;;
*) VENV="$PWD/$VENV" ;; # sourced from the checkout's root
esac

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$0: run as root: laminae mounts layers, attaches loop devices and makes devices" >&2
        exit 1
    fi
}

# install_packages PKG...: apt-get only what is missing, and update the lists only then.
install_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}"
    fi
}

# find_python: the first python3 that is 3.11 or newer, in $PYTHON.
find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON="$(command -v "$candidate")"
            return 0
        fi
    done
    echo "$0: laminae needs Python 3.11 or newer (apt-get install python3)" >&2
    exit 1
}

# make_venv PIP-ARGS...: create $VENV once, then pip install into it.
make_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        find_python
        if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
            # Debian's own python3 leaves ensurepip to a separate package.
            install_packages "python3-venv"
        fi
        echo "==> $PYTHON -m venv $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    echo "==> pip install $*"
    "$VENV/bin/python" -m pip install -q "$@"
}

# Loop devices back the blockfile driver's images and the btrfs driver's test filesystems.
ensure_loop_devices() {
    if [ ! -e /dev/loop-control ]; then
        modprobe loop 2>/dev/null || true
    fi
}
