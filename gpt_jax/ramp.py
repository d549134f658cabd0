"""GPT-3's batch-size ramp as a table of stages, and tokens as a function of the step.

GPT-3 §B grows the batch linearly from a small value to the full one over the
first 4-12B tokens, and states its learning-rate schedule in tokens. Once the
batch changes during training a step no longer stands for a fixed number of
tokens, so the step -> sequences map lives here: `stages` quantises the
linear ramp into a few constant batches (each is one compiled step shape),
`sequences_before` maps an optimiser step to the sequences consumed before
it (inside jit too), and `stage_at` tells the training loop which batch a
step takes.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from gpt_jax.errors import ConfigError

# The ramp is cut into this many equal slices of its tokens; each slice takes the ramp's batch
# where it starts, so a ramp compiles at most STAGES + 1 step shapes (fewer where rounding merges).
STAGES = 8


@dataclasses.dataclass(frozen=True)
class Stage:
  first_step: int
  first_sequence: int  # Sequences consumed before this stage: the data position.
  batch_size: int  # Global batch of this stage, in sequences.
  num_steps: int  # 0 = the stage runs to the end of training.


def stages(
  batch_size: int,
  seq_len: int,
  ramp_start: int = 0,
  ramp_tokens: int = 0,
  *,
  num_stages: int = STAGES,
  multiple: int = 1,
) -> list[Stage]:
  """The stages of a linear ramp from `ramp_start` to `batch_size` sequences over `ramp_tokens`.

  Stage i of `num_stages` starts at the first step on or after i / num_stages
  of `ramp_tokens` and uses the ramp's batch there, start + (full - start) *
  i / num_stages, rounded down to a multiple of `multiple` (what the data-
  parallel devices and accumulation steps split evenly) and at least
  `multiple`. After the ramp: the full batch. `ramp_tokens=0`: one stage.
  """
  if batch_size % multiple:
    raise ConfigError(f"config.train.batch_size={batch_size} must be a multiple of {multiple}")
  bounds: list[tuple[int, int]] = []  # (batch, the sequence where its slice of the ramp ends)
  for i in range(num_stages if ramp_tokens > 0 else 0):
    size = ramp_start + (batch_size - ramp_start) * i / num_stages
    size = min(max(multiple, int(size) // multiple * multiple), batch_size)
    end = math.ceil(ramp_tokens / seq_len * (i + 1) / num_stages)
    if size == batch_size:  # The rest of the ramp is the final stage.
      break
    if bounds and bounds[-1][0] == size:  # Rounding merged two slices.
      bounds.pop()
    bounds.append((size, end))
  out: list[Stage] = []
  step, seqs = 0, 0
  for size, end in bounds:
    n = math.ceil((end - seqs) / size)
    if n > 0:
      out.append(Stage(step, seqs, size, n))
      step, seqs = step + n, seqs + n * size
  out.append(Stage(step, seqs, batch_size, 0))
  return out


def sequences_before(step, table: list[Stage]):
  """Sequences consumed before step `step` (an int, or a traced int32: exact up to 2^31
  sequences, GPT-3 175B's 300B tokens are 146M)."""
  total = 0
  for s in table:
    n = step - s.first_step
    n = jnp.clip(n, 0, s.num_steps) if s.num_steps else jnp.maximum(n, 0)
    total = total + n * s.batch_size
  return total


def stage_at(step: int, table: list[Stage]) -> Stage:
  """The stage that step `step` belongs to (host side: picks the compiled shape)."""
  return [s for s in table if s.first_step <= step][-1]
