#!/usr/bin/env bash
# Quick start for a fresh clone on Debian 12 (or any machine with Python >= 3.10).
#   tools/bootstrap.sh run   [twistd options...]  install into .venv and run `twistd -n mtrkmta`
#   tools/bootstrap.sh test  [tox options...]     install what the tests need and run the suite
set -euo pipefail
cd "$(dirname "$0")/.."

# The Debian packages `run` needs, and those the whole test suite needs on top: the
# interop tests drive real Dovecot LMTP, Postfix (with its smtp-sink/smtp-source) and
# swaks; the `postgres` tox env runs the tracking store on a real PostgreSQL server.
RUN_PACKAGES=(python3 python3-venv)
TEST_PACKAGES=(python3 python3-venv dovecot-core dovecot-lmtpd postfix swaks postgresql bsd-mailx chromium prometheus)
# "No configuration": no /etc/postfix/main.cf, nothing listening; the tests run their own.
POSTFIX_PRESEED="postfix postfix/main_mailer_type select No configuration"

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

missing_packages() {   # missing_packages PKG... : print those not installed (Debian only)
  command -v dpkg-query >/dev/null 2>&1 || return 0   # not Debian: nothing to check here
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
      echo "$pkg"
  done
}

install_line() {   # the command a non-root user must run to install PKG...
  echo "echo '$POSTFIX_PRESEED' | sudo debconf-set-selections &&" \
       "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $*"
}

OWN_POLICY_RC=   # a policy-rc.d this script wrote, removed again on exit
remove_own_policy_rc() { if [ -n "$OWN_POLICY_RC" ]; then rm -f "$OWN_POLICY_RC"; fi; OWN_POLICY_RC=; }

apt_install() {   # as root: install PKG... non-interactively, starting no service
  echo "$POSTFIX_PRESEED" | debconf-set-selections
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # exit 101: maintainer scripts start no service
    OWN_POLICY_RC=/usr/sbin/policy-rc.d
    trap remove_own_policy_rc EXIT
    trap 'remove_own_policy_rc; exit 130' INT TERM
    printf '#!/bin/sh\n# written by mtrkmta tools/bootstrap.sh while it runs apt-get\nexit 101\n' \
      > "$OWN_POLICY_RC"
    chmod 755 "$OWN_POLICY_RC"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  remove_own_policy_rc
  trap - EXIT INT TERM
}

ensure_system_packages() {   # ensure_system_packages PKG... (python3* only if no usable Python)
  local missing=() pkg
  for pkg in $(missing_packages "$@"); do
    case "$pkg" in
      python3|python3-venv) pick_python >/dev/null || missing+=("$pkg") ;;
      *) missing+=("$pkg") ;;
    esac
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ]; then
    apt_install "${missing[@]}"
  else
    die "missing system packages; run: $(install_line "${missing[@]}")"
  fi
}

venv_at() {   # venv_at DIR PACKAGES... : create DIR if needed and install PACKAGES into it
  local dir=$1; shift
  local py stamp
  py=$(pick_python) || die "no Python >= 3.10 with venv and ensurepip found"
  [ -x "$dir/bin/python" ] || "$py" -m venv "$dir"
  # Install only when what is asked for changed: the request and pyproject.toml (the
  # dependencies and entry points) are the stamp. The editable install follows the code.
  stamp=$( (printf '%s\n' "$@"; cat pyproject.toml) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$dir/.bootstrap-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
  echo "$stamp" > "$dir/.bootstrap-stamp"
}

cmd=${1:-}; shift || true
case "$cmd" in
  run)
    ensure_system_packages "${RUN_PACKAGES[@]}"
    # compat mode puts the clone on sys.path, where twistd looks for twisted/plugins.
    venv_at .venv --config-settings editable_mode=compat -e .
    exec .venv/bin/twistd -n mtrkmta "$@"
    ;;
  test)
    ensure_system_packages "${TEST_PACKAGES[@]}"
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
