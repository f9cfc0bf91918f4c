# shellcheck shell=bash
# Helpers sourced by the launch scripts.
# DRY_RUN=1: print every command (shell-quoted, one per line) instead of running it.

# Shell-quotes the arguments like Python's shlex.join: single quotes only where needed.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\"\'\"\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# The training command line for PYTHON CONFIG WORKDIR [--config.key=value ...], quoted for a
# remote shell.
train_command() {
  quote "$1" -m evejax.train "--config=$2" "--workdir=$3" "${@:4}"
}
