# Shared by the setup scripts (sourced): logging with the caller's LOG_TAG, and Debian packages
# installed when running as root (otherwise the exact apt-get command to run is printed).
log() { printf '[%s] %s\n' "${LOG_TAG:-setup}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${LOG_TAG:-setup}" "$*" >&2; exit 1; }

has_python_headers() {  # $1: an interpreter; true when its Python.h is installed
    "$1" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'
}

apt_install() {  # $1: what for; rest: Debian packages
    local why=$1; shift
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing system packages ($why): $*"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null
            apt-get install -y -q --no-install-recommends "$@" >/dev/null
        }
    else
        die "missing system packages $why: $*
  install them with:  sudo apt-get install -y $*
  then run this again."
    fi
}
