#!/usr/bin/env bash
# N training processes on this machine, each with its own fake CPU devices,
# joined by jax.distributed on 127.0.0.1: the multi-host code path of a TPU
# pod or GPU cluster (per-process data shards, global arrays, multi-host
# checkpoints), runnable on a laptop.
#
#   launch/local.sh [options] N [flags for python -m gpt_jax.main ...]
#   launch/local.sh 2 --config=configs/debug.py --workdir=runs/local2
#
# Options (before N):
#   --devices-per-process=K  fake CPU devices per process (default 1)
#   --port=P                 coordinator port on 127.0.0.1, 1-65535 (default: a free one)
#   --log-dir=DIR            process i logs to DIR/process_<i>.log (default:
#                            <workdir>/logs); process 0 also streams to stdout
#   --python=PY              interpreter (default: $PYTHON or python)
#   --preflight              first plan the config on N*K CPU devices
#                            (python -m gpt_jax.plan --target=cpu:N*K --check)
#                            and refuse to start if it does not fit (exit 3;
#                            exit 2 if the planner itself fails)
#   --dry-run                print the commands as a script, run nothing
# Options are strict: a value goes after '=' (--port=1234, not --port 1234); an
# unknown option, a missing, empty or bad value, a value on a flag, or a
# launcher option after N (where it would reach gpt_jax.main) is one line on
# stderr and exit 2 before any process starts (dry runs too).
# SIGTERM / Ctrl-C are forwarded to every process (each saves a checkpoint at
# its next step and exits); if one process fails the others are stopped, and
# the exit status is the first failure's.
set -euo pipefail

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "local.sh: $*" >&2; exit 2; }

# Strict option parsing, the same in every launch/ script (each is one file:
# sbatch runs a copy of its script, so nothing could be sourced from beside it).
# $arg is the word, $opt its name; `value VAR META REGEX WHAT` stores the value
# after '=' in VAR, refusing an empty one or one REGEX does not match; `flag
# [VAR]` sets VAR to 1, refusing a value.
value() {
  [[ "$arg" == *=?* ]] || die "$opt needs a value ($opt=$2): $4"
  [[ "${arg#*=}" =~ $3 ]] || die "$arg: expected $4"
  printf -v "$1" '%s' "${arg#*=}"
}
flag() {
  [[ "$arg" != *=* ]] || die "$opt takes no value (got $arg)"
  [[ -z "${1:-}" ]] || printf -v "$1" 1
}
# Every option but --help (gpt_jax.main has its own): none may follow N.
options="--devices-per-process= --port= --log-dir= --python= --preflight --dry-run"
is_option() { [[ " ${options//=/} " == *" ${1%%=*} "* ]]; }

devices=1
port=""
log_dir=""
python_bin="${PYTHON:-python}"
preflight=0
dry_run=0
while [[ $# -gt 0 && "$1" == -* ]]; do
  arg="$1" opt="${1%%=*}"
  shift
  case "$opt" in
    --devices-per-process) value devices K '^[1-9][0-9]*$' "a positive integer" ;;
    --port)
      value port P '^[1-9][0-9]{0,4}$' "a port number from 1 to 65535"
      ((port <= 65535)) || die "$arg: expected a port number from 1 to 65535"
      ;;
    --log-dir) value log_dir DIR '.' "a directory for the process logs" ;;
    --python)
      value python_bin PY '.' "a Python interpreter"
      command -v "$python_bin" >/dev/null || die "$arg: no such program"
      ;;
    --preflight) flag preflight ;;
    --dry-run) flag dry_run ;;
    -h | --help) flag; usage; exit 0 ;;
    --) die "no -- here: launcher options, then the number of processes N, then the training flags" ;;
    --config | --config.* | --workdir) die "$arg is a training flag: give the number of processes N first" ;;
    *) die "unknown option $arg; the options are ${options} --help (then the number of processes N, then training flags)" ;;
  esac
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  die "give the number of processes N, a positive integer, after the options and before the training flags (got '${1:-}')"
fi
num=$1
shift
main_args=("$@")
for a in "${main_args[@]}"; do
  is_option "$a" && die "$a after N would go to gpt_jax.main: launcher options go before N"
done

config="" workdir=""
for a in "${main_args[@]}"; do
  case "$a" in
    --config=*) config="${a#*=}" ;;
    --workdir=*) workdir="${a#*=}" ;;
  esac
done
# config overrides (--config.x.y=v) also steer the planner.
overrides=()
for a in "${main_args[@]}"; do
  [[ "$a" == --config.* ]] && overrides+=("$a")
done

if [[ -z "$port" ]]; then
  if ((dry_run)); then
    port=PORT
  else
    port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
if [[ -z "$log_dir" ]]; then
  log_dir="${workdir:-.}/logs"
fi

# Words as a shell would need them typed: plain when safe, else in single quotes.
quote() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

if ((preflight)); then
  plan_cmd=("$python_bin" -m gpt_jax.plan "--config=$config" "${overrides[@]}" "--target=cpu:$((num * devices))" --check)
  if ((dry_run)); then
    quote "${plan_cmd[@]}"
    echo
  else
    echo "preflight: $(quote "${plan_cmd[@]}")" >&2
    plan_status=0
    "${plan_cmd[@]}" || plan_status=$?
    if ((plan_status == 3)); then
      echo "local.sh: preflight failed: the configuration does not fit (see above); not starting" >&2
      exit 3
    elif ((plan_status != 0)); then
      echo "local.sh: preflight failed: the planner failed (exit $plan_status, see above); not starting" >&2
      exit 2
    fi
  fi
fi

env_prefix=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
# The command of process $1, in the array `cmd`.
process_command() {
  cmd=("${env_prefix[@]}" "$python_bin" -m gpt_jax.main "${main_args[@]}")
  if ((num > 1)); then
    cmd+=("--coordinator_address=127.0.0.1:$port" "--num_processes=$num" "--process_id=$1")
  fi
}

# JAX's CPU collectives (gloo) print "[Gloo] Rank I is connected to N peer
# ranks..." on every start; the terminal copy of process 0's output leaves it
# out (its log keeps everything).
gloo_noise='^\[Gloo\] Rank [0-9]* is connected to'

# --dry-run prints what the launch below does, as a script: every process in
# the background (process 0 through tee), then wait for them all.
if ((dry_run)); then
  echo "mkdir -p $(quote "$log_dir")"
  for ((i = 0; i < num; i++)); do
    process_command "$i"
    if ((i == 0)); then
      echo "$(quote "${cmd[@]}") 2>&1 | tee $(quote "$log_dir/process_$i.log") | grep --line-buffered -v $(quote "$gloo_noise") &"
    else
      echo "$(quote "${cmd[@]}") > $(quote "$log_dir/process_$i.log") 2>&1 &"
    fi
  done
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir"
pids=() # the processes still running
stopping=0
forward() {
  stopping=1
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
trap forward TERM INT

for ((i = 0; i < num; i++)); do
  process_command "$i"
  log="$log_dir/process_$i.log"
  if ((i == 0)); then
    # Process 0 is the one that logs: stream it and keep a copy.
    "${cmd[@]}" > >(tee "$log" | grep --line-buffered -v "$gloo_noise") 2>&1 &
  else
    "${cmd[@]}" >"$log" 2>&1 &
  fi
  pids+=($!)
done
echo "local.sh: $num processes x $devices devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

status=0
while ((${#pids[@]} > 0)); do
  finished=""
  # wait -n returns when any child exits (or a trapped signal arrives).
  if wait -n -p finished "${pids[@]}"; then code=0; else code=$?; fi
  if [[ -z "${finished:-}" ]]; then
    continue # interrupted by a signal: forward() has run, keep waiting
  fi
  # Only the running ones: wait names a reaped pid as "no such job".
  running=()
  for p in "${pids[@]}"; do
    [[ "$p" == "$finished" ]] || running+=("$p")
  done
  pids=("${running[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    if ((!stopping)); then
      echo "local.sh: a process exited with status $code; stopping the others" >&2
      forward
    fi
  fi
done
for ((i = 1; i < num; i++)); do
  if ((status != 0)); then
    echo "--- tail of $log_dir/process_$i.log" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
  fi
done
exit "$status"
