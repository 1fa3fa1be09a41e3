#!/usr/bin/env bash
# Developer entry point: `./dev.sh demo` runs the main job, `./dev.sh test` runs the test suite.
# Creates .venv from the pinned requirement files on first use (and again when they change).
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp=$(cat requirements-dev.txt requirements-nodeps.txt | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[dev] setting up $venv (pinned requirements)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  echo "$stamp" > "$venv/.stamp"
fi
py="$venv/bin/python"
cmd=${1:-help}; shift || true
case "$cmd" in
  test)
    # the training tab's browser test also runs on Gradio 4 (Forge, Neo), from its own pinned stack
    g4=.venv-gradio4
    g4stamp=$(sha256sum requirements-gradio4.txt | cut -c1-16)
    if [ "$(cat "$g4/.stamp" 2>/dev/null)" != "$g4stamp" ]; then
      echo "[dev] setting up $g4 (Gradio 4 for the tab's browser test)..." >&2
      rm -rf "$g4"
      "$py" -m pip install -q --disable-pip-version-check --target "$g4" -r requirements-gradio4.txt 2>&1 |
        grep -v -e "dependency resolver" -e "requires .*, but you have" -e "which is not installed" >&2 || true
      [ -d "$g4/gradio" ] || { echo "[dev] installing $g4 failed" >&2; exit 1; }
      echo "$g4stamp" > "$g4/.stamp"
    fi
    # lint and format first: a style slip fails here in seconds, not after the whole suite
    "$venv/bin/ruff" check --quiet . && "$venv/bin/ruff" format --check --quiet . || {
      echo "[dev] ruff found problems: run '$venv/bin/ruff check --fix . && $venv/bin/ruff format .'" >&2; exit 1; }
    set +e
    "$py" -m pytest -q -p no:cacheprovider "$@"
    rc=$?
    set -e
    # pytest exit 5 means no test ran: that is a failure here, never a silent pass.
    [ "$rc" -eq 5 ] && echo "[dev] no tests were collected" >&2
    exit "$rc" ;;
  demo) exec "$py" -m perfusion.demo "$@" ;;
  bench) exec "$py" "benchmarks/$1.py" "${@:2}" ;;
  python) exec "$py" "$@" ;;
  *) echo "usage: ./dev.sh test [pytest args] | demo | bench NAME | python ARGS" >&2; exit 2 ;;
esac
