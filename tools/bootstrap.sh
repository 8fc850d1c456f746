#!/usr/bin/env bash
# Quick start for a fresh clone on Debian 12 (or any machine with Python >= 3.10).
#   tools/bootstrap.sh run   [twistd options...]  install into .venv and run `twistd -n mtrkmta`
#   tools/bootstrap.sh test  [tox options...]     install what the tests need and run the suite
set -euo pipefail
cd "$(dirname "$0")/.."

# The Debian packages the whole test suite needs; later issues add Dovecot, Postfix, swaks
# and PostgreSQL here.
SYSTEM_PACKAGES=(python3 python3-venv)

die() { echo "bootstrap: $*" >&2; exit 1; }

pick_python() {
  for candidate in python3 python3.13 python3.12 python3.11 python3.10; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

ensure_system_packages() {
  local missing=()
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if ! command -v dpkg-query >/dev/null 2>&1; then
    missing=()   # not Debian: rely on what pick_python finds
  fi
  if [ "${#missing[@]}" -gt 0 ] && ! pick_python >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
      die "missing system packages; run: sudo apt-get install -y --no-install-recommends ${missing[*]}"
    fi
  fi
}

venv_at() {   # venv_at DIR PACKAGES... : create DIR if needed and install PACKAGES into it
  local dir=$1; shift
  local py
  py=$(pick_python) || die "no Python >= 3.10 with venv and ensurepip found"
  [ -x "$dir/bin/python" ] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

cmd=${1:-}; shift || true
case "$cmd" in
  run)
    ensure_system_packages
    # compat mode puts the clone on sys.path, where twistd looks for twisted/plugins.
    venv_at .venv --config-settings editable_mode=compat -e .
    exec .venv/bin/twistd -n mtrkmta "$@"
    ;;
  test)
    ensure_system_packages
    venv_at .tox-bootstrap 'tox>=4.11'
    # pyenv machines keep several interpreters behind shims that answer for one version
    # only: put every installed CPython 3.10+ on PATH (after everything else) for tox.
    if command -v pyenv >/dev/null 2>&1; then
      for version in $(pyenv versions --bare | grep -E '^3\.1[0-9](\.[0-9]+)?$'); do
        PATH="$PATH:$(pyenv root)/versions/$version/bin"
      done
      export PATH
    fi
    exec .tox-bootstrap/bin/tox "$@"
    ;;
  *)
    die "usage: tools/bootstrap.sh run|test [options]"
    ;;
esac
