#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create (or reuse) the slice, install this
# checkout on every worker, run the same `python -m gpt_jax.main` on all
# workers (jax.distributed finds its peers from the TPU metadata), stream the
# logs, and delete the slice on request.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator-type=v5litepod-16 [options] \
#       -- --config=configs/gpt2_xl.py --workdir=gs://BUCKET/runs/xl [--config.x.y=...]
#
# Options:
#   --name=NAME               TPU VM name (required)
#   --zone=ZONE               e.g. us-west4-a (required)
#   --project=PROJECT         gcloud project (default: gcloud's configured one)
#   --accelerator-type=TYPE   v5litepod-16, v4-32, v5p-64, v6e-8 ... (default v5litepod-8)
#   --version=RUNTIME         TPU VM image (default: v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base otherwise)
#   --spot | --preemptible    cheaper capacity that may be reclaimed (a SIGTERM: the trainer saves and exits;
#                             run the same command again to resume); one or the other
#   --queued                  request capacity through a queued resource (waits until it is ACTIVE)
#   --valid-until=DURATION    queued request expiry, e.g. 6h (with --queued)
#   --jax-version=X           jax[tpu]==X on the workers (default: this machine's jax)
#   --remote-dir=DIR          checkout location on the workers (default gpt_jax, under $HOME)
#   --skip-install            reuse what is installed on the workers
#   --preflight               plan the config for this slice first (python -m gpt_jax.plan
#                             --target=tpu:TYPE --check, needs libtpu here) and refuse a config that does not fit
#                             (exit 3; exit 2 if the planner itself fails)
#   --logs                    only stream worker 0's log of a running job (tail -f)
#   --delete                  delete the slice (and queued resource) at the end, also when a step
#                             fails after the create (the exit status stays that step's), or alone: just delete
#   --dry-run                 print the commands, run nothing
# Options are strict: a value goes after '=' (--zone=us-west4-a, not --zone us-west4-a)
# and must look right; an unknown option, a missing or empty value, a value on a
# flag, or a launcher option after -- (where it would reach gpt_jax.main) is
# one line on stderr and exit 2, before anything is created or run (dry runs too).
# The workdir must be a gs:// path (workers share no disk); gpt_jax writes it
# through Orbax and etils.epath (gcsfs, installed with the requirements).
#
# Multi-slice jobs (several slices joined by the data-centre network, DCN; e.g.
# 2 x v5p-1024) are not created by this script. Request the slices as one
# queued resource, `gcloud compute tpus queued-resources create NAME
# --zone=ZONE --accelerator-type=v5p-1024 --runtime-version=v2-alpha-tpuv5
# --node-count=2 --node-prefix=NAME` (slices NAME-0, NAME-1), install this
# checkout on every worker of every slice, and run the same `python3 -m
# gpt_jax.main --config=... --config.mesh.dcn_data=2` on all of them (`gcloud
# compute tpus tpu-vm ssh NAME-I --worker=all --command=...`, one per slice).
# The TPU runtime sets MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES /
# MEGASCALE_SLICE_ID on every host: jax.distributed joins all of them and the
# devices carry their slice_index, so sharding.make_mesh lays data parallelism
# over the slices (mesh.dcn_data, default -1 = all slices) and FSDP / tensor
# inside each. Plan it first: python -m gpt_jax.plan --target=tpu:v5p-1024x2.
set -euo pipefail

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

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
# Every option but --help (gpt_jax.main has its own): none may follow --.
options="--name= --zone= --project= --accelerator-type= --version= --spot --preemptible --queued --valid-until="
options+=" --jax-version= --remote-dir= --skip-install --preflight --logs --delete --dry-run"
is_option() { [[ " ${options//=/} " == *" ${1%%=*} "* ]]; }

name="" zone="" project="" accel="v5litepod-8" version="" capacity="" queued=0 valid_until=""
jax_version="" remote_dir="gpt_jax" skip_install=0 preflight=0 logs_only=0 delete=0 dry_run=0
spot=0 preemptible=0
python_bin="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
  arg="$1" opt="${1%%=*}"
  shift
  [[ "$arg" == -- ]] && break
  case "$opt" in
    --name) value name NAME '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
      "a TPU VM name: a lowercase letter, then lowercase letters, digits or -, at most 63" ;;
    --zone) value zone ZONE '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "a zone such as us-west4-a" ;;
    # Project IDs: 6 to 30 characters; old domain-scoped ones are DOMAIN:ID.
    --project) value project PROJECT '^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$' \
      "a project ID: 6 to 30 lowercase letters, digits or -, starting with a letter" ;;
    --accelerator-type) value accel TYPE '^v[0-9]+[a-z]*-[1-9][0-9]*$' \
      "a TPU type GENERATION-SIZE such as v5litepod-16, v4-32, v5p-64 or v6e-8" ;;
    --version) value version RUNTIME '^[a-z0-9][-a-z0-9._]*$' "a TPU VM runtime such as tpu-ubuntu2204-base" ;;
    --spot) flag spot ;;
    --preemptible) flag preemptible ;;
    --queued) flag queued ;;
    --valid-until) value valid_until DURATION '^([0-9]+[dhms])+$' "a duration such as 6h, 90m or 1d12h" ;;
    # Both go into a remote shell command line: plain words only.
    --jax-version) value jax_version X '^[0-9]+(\.[0-9]+)+[a-z0-9.+]*$' "a jax release such as 0.10.2" ;;
    --remote-dir) value remote_dir DIR '^[A-Za-z0-9_][A-Za-z0-9._/-]*$' \
      "a path under the workers' home of letters, digits, . _ - and /" ;;
    --skip-install) flag skip_install ;;
    --preflight) flag preflight ;;
    --logs) flag logs_only ;;
    --delete) flag delete ;;
    --dry-run) flag dry_run ;;
    -h | --help) flag; usage; exit 0 ;;
    --config | --config.* | --workdir) die "$arg is a training flag: training flags go after --" ;;
    *) die "unknown option $arg; the options are ${options} --help (training flags go after --)" ;;
  esac
done
main_args=("$@")
for a in "${main_args[@]}"; do
  is_option "$a" && die "$a after -- would go to gpt_jax.main: launcher options go before --"
done
((spot && preemptible)) && die "give --spot or --preemptible, not both"
((spot)) && capacity="--spot"
((preemptible)) && capacity="--preemptible"

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
if ((queued)) && [[ "$capacity" == "--preemptible" ]]; then
  die "queued resources take --spot, not --preemptible"
fi
if ((!queued)) && [[ -n "$valid_until" ]]; then
  die "--valid-until=$valid_until is for a queued resource: add --queued"
fi
if [[ -z "$version" ]]; then
  case "$accel" in
    v5litepod-* | v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi

config="" workdir=""
overrides=()
for a in "${main_args[@]}"; do
  case "$a" in
    --config=*) config="${a#*=}" ;;
    --workdir=*) workdir="${a#*=}" ;;
    --config.*) overrides+=("$a") ;;
  esac
done
run_job=$(( ${#main_args[@]} > 0 ))
if ((run_job)); then
  [[ -n "$config" ]] || die "give --config=... after --"
  [[ "$workdir" == gs://?* ]] || die "--workdir must be a gs:// path: the workers share no disk (got '${workdir}')"
elif ((!delete && !logs_only)); then
  die "nothing to do: give training flags after --, or --logs, or --delete"
fi
if ((logs_only && (run_job || delete))); then
  die "--logs only follows a running job's log: give it without training flags and without --delete"
fi

gcloud_tpu=(gcloud compute tpus)
where=("--zone=$zone")
[[ -n "$project" ]] && where+=("--project=$project")

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
# Runs (or, with --dry-run, prints) one command.
run() {
  if ((dry_run)); then
    quote "$@"
    echo
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}
remote() { run "${gcloud_tpu[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"; }

delete_slice() {
  if ((queued)); then
    run "${gcloud_tpu[@]}" queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run "${gcloud_tpu[@]}" tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

log_file="\$HOME/$remote_dir-train.log"
if ((logs_only)); then
  run "${gcloud_tpu[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 --command="tail -n 200 -F $log_file"
  exit 0
fi
if ((!run_job)); then
  delete_slice
  exit 0
fi

# The workers get this machine's jax unless told otherwise: looked up before anything is created.
if ((!skip_install)) && [[ -z "$jax_version" ]]; then
  if ((dry_run)); then
    jax_version="JAX_VERSION"
  else
    jax_version=$("$python_bin" -c 'import jax; print(jax.__version__)') ||
      die "could not read this machine's jax version with $python_bin: give --jax-version=X or --skip-install"
  fi
fi

# 1. Preflight on this machine: the TPU compiler's own memory plan for the slice.
if ((preflight)); then
  plan_cmd=("$python_bin" -m gpt_jax.plan "--config=$config" "${overrides[@]}" "--target=tpu:$accel" --check)
  plan_status=0
  run "${plan_cmd[@]}" || plan_status=$?
  if ((plan_status == 3)); then
    echo "tpu_pod.sh: preflight failed: the configuration does not fit $accel (see above); not starting" >&2
    exit 3
  elif ((plan_status != 0)); then
    echo "tpu_pod.sh: preflight failed: the planner failed (exit $plan_status, see above); not starting" >&2
    exit 2
  fi
fi

# From the create on, --delete deletes the slice however the script ends (a
# failed create, install or job too: the checkpoints are in the bucket), and
# the exit status stays the failing step's.
delete_on_exit() {
  local status=$? delete_status=0
  trap - EXIT
  # Terminated mid-step (SIGTERM, Ctrl-C): end the step's gcloud session too.
  pkill -TERM -P $$ 2>/dev/null || true
  delete_slice || delete_status=$?
  ((status != 0)) || status=$delete_status
  exit "$status"
}
if ((delete)); then
  trap delete_on_exit EXIT
fi

# 2. Create the slice, or reuse one of that name.
exists=0
if ((!dry_run)) && "${gcloud_tpu[@]}" tpu-vm describe "$name" "${where[@]}" >/dev/null 2>&1; then
  exists=1
  echo "tpu_pod.sh: reusing TPU VM $name" >&2
fi
if ((!exists)); then
  ((dry_run)) && echo "# unless TPU VM $name exists already:"
  if ((queued)); then
    create=("${gcloud_tpu[@]}" queued-resources create "$name" "${where[@]}" "--node-id=$name"
      "--accelerator-type=$accel" "--runtime-version=$version")
    [[ -n "$capacity" ]] && create+=("$capacity")
    [[ -n "$valid_until" ]] && create+=("--valid-until-duration=$valid_until")
    run "${create[@]}"
    if ((!dry_run)); then
      echo "tpu_pod.sh: waiting for queued resource $name to become ACTIVE" >&2
      while :; do
        state=$("${gcloud_tpu[@]}" queued-resources describe "$name" "${where[@]}" --format='value(state.state)')
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED)
            echo "tpu_pod.sh: queued resource $name is $state" >&2
            exit 1
            ;;
        esac
        sleep 30
      done
    fi
  else
    create=("${gcloud_tpu[@]}" tpu-vm create "$name" "${where[@]}" "--accelerator-type=$accel" "--version=$version")
    [[ -n "$capacity" ]] && create+=("$capacity")
    run "${create[@]}"
  fi
fi

# 3. This checkout (its files as they are now, untracked ones too unless ignored) and its requirements on every worker.
if ((!skip_install)); then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  bundle="${TMPDIR:-/tmp}/gpt_jax-$name.tgz"
  if ((dry_run)); then
    echo "(cd $(quote "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote "$bundle"))"
  else
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$bundle")
  fi
  run "${gcloud_tpu[@]}" tpu-vm scp "$bundle" "$name:gpt_jax.tgz" "${where[@]}" --worker=all
  remote "mkdir -p ~/$remote_dir && tar xzf ~/gpt_jax.tgz -C ~/$remote_dir && cd ~/$remote_dir && python3 -m pip install -q -r requirements.txt -r requirements-gcs.txt \"jax[tpu]==$jax_version\""
fi

# 4. The same command on every worker; gcloud streams their output (only
# process 0 logs), and each worker keeps a copy in ~/<remote-dir>-train.log.
# 5. With --delete, the EXIT trap above deletes the slice.
remote "cd ~/$remote_dir && python3 -m gpt_jax.main $(quote "${main_args[@]}") 2>&1 | tee -a $log_file; exit \${PIPESTATUS[0]}"
