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
# SIGTERM / Ctrl-C are forwarded to every process (each saves a checkpoint at
# its next step and exits); if one process fails the others are stopped, and
# the exit status is the first failure's.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

devices=1
port=""
log_dir=""
python_bin="${PYTHON:-python}"
preflight=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices-per-process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log-dir=*) log_dir="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --preflight) preflight=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --*) echo "local.sh: unknown option $1 (launch options, then the number of processes N, then training flags)" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: give the number of processes N (a positive integer) before the training flags" >&2
  usage >&2
  exit 2
fi
num=$1
shift
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --devices-per-process=$devices must be a positive integer" >&2
  exit 2
fi
if [[ -n "$port" ]] && ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ && "$port" -le 65535 ]]; then
  echo "local.sh: --port=$port must be a port number from 1 to 65535" >&2
  exit 2
fi
main_args=("$@")

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

# --dry-run prints what the launch below does, as a script: every process in
# the background (process 0 through tee), then wait for them all.
if ((dry_run)); then
  echo "mkdir -p $(quote "$log_dir")"
  for ((i = 0; i < num; i++)); do
    process_command "$i"
    if ((i == 0)); then
      echo "$(quote "${cmd[@]}") 2>&1 | tee $(quote "$log_dir/process_$i.log") &"
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
    "${cmd[@]}" > >(tee "$log") 2>&1 &
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
