"""Training entry point: flags -> config -> pretrain.run (or finetune.run for job="finetune").

  python -m gpt_jax.main --config=configs/shakespeare.py --workdir=runs/shakespeare
  python -m gpt_jax.main --config=configs/gpt2_medium.py --workdir=gs://bucket/runs/medium \
      --config.train.batch_size=256 --config.mesh.fsdp=8
  python -m gpt_jax.main --config=configs/ladder_shakespeare.py --workdir=runs/ladder --ladder

Re-running the same command on a workdir with checkpoints resumes it.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from gpt_jax import cli, distributed, finetune, ladder, pretrain
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError

PROFILE_STEPS = 5  # Steps --profile traces when config.log.profile_steps is 0.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory, a local path or gs://BUCKET/PATH: config, tokenizer, checkpoints, metrics."
)
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process jobs (gpt_jax/distributed.py): TPU pods and SLURM are detected;
# anything else (launch/local.sh, a custom launcher) passes these three.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_LADDER = flags.DEFINE_bool(
  "ladder",
  False,
  "Train the scaling-law ladder of config.ladder in --workdir and fit it (as python -m gpt_jax.ladder).",
)
_PROFILE = flags.DEFINE_bool(
  "profile",
  False,
  f"Trace config.log.profile_steps steps ({PROFILE_STEPS} if 0) with jax.profiler into <workdir>/profile.",
)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if _PROFILE.value and not config.log.profile_steps:
    config.log.profile_steps = PROFILE_STEPS
  config = config_lib.validate(config)
  logging.set_verbosity(logging.INFO)
  # Before anything touches devices: jax.devices() fixes the device set.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _LADDER.value:  # So launch/* can run a ladder on a pod or cluster.
    ladder.run(
      config,
      _WORKDIR.value,
      config_file=config_flags.get_config_filename(flags.FLAGS["config"]),
      user_overrides=ladder.user_overrides(sys.argv[1:]),
    )
    return
  if config.job == "finetune":
    finetune.run(config, _WORKDIR.value)  # Its metrics dict must not reach sys.exit (exit 1).
    return
  pretrain.run(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
