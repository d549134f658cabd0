"""The batch ramp's stage table (gpt_jax/ramp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import ramp
from gpt_jax.errors import ConfigError


@pytest.mark.parametrize("start, ramp_tokens, multiple", [(16, 12e9, 64), (16, 4e9, 16), (100, 1e9, 1)])
def test_stages_follow_the_linear_ramp(start, ramp_tokens, multiple):
  full, seq, n = 1536, 2048, 8
  table = ramp.stages(full, seq, start, int(ramp_tokens), num_stages=n, multiple=multiple)
  sizes = [s.batch_size for s in table]
  assert len(sizes) <= n + 1 and sizes == sorted(set(sizes)) and sizes[-1] == full
  assert all(b % multiple == 0 for b in sizes) and sizes[0] == max(multiple, start // multiple * multiple)
  # Stages are contiguous in steps and sequences; the last runs to the end.
  for a, b in zip(table, table[1:]):
    assert b.first_step == a.first_step + a.num_steps
    assert b.first_sequence == a.first_sequence + a.num_steps * a.batch_size
  assert table[-1].num_steps == 0
  # The full batch starts once the ramp's tokens are consumed (to within one step of a stage).
  ramp_seqs = ramp_tokens / seq
  assert ramp_seqs <= table[-1].first_sequence < ramp_seqs + sizes[-2]
  # Each stage's batch is the linear ramp's value where the stage starts (rounded down), never above.
  for s in table[:-1]:
    linear = start + (full - start) * s.first_sequence / ramp_seqs
    assert s.batch_size <= max(linear, multiple) + 1e-9
    assert s.batch_size > linear - (full - start) / n - multiple


def test_sequences_before_matches_the_batches_run():
  table = ramp.stages(256, 2048, 16, 4_000_000_000, num_stages=4, multiple=16)
  last = table[-1].first_step + 50
  consumed = np.cumsum([0] + [ramp.stage_at(s, table).batch_size for s in range(last)])
  steps = jnp.arange(last + 1, dtype=jnp.int32)
  got = jax.jit(lambda s: ramp.sequences_before(s, table))(steps)
  np.testing.assert_array_equal(np.asarray(got), consumed)
  assert [ramp.sequences_before(s, table) for s in (0, 7, last)] == [0, consumed[7], consumed[last]]


def test_no_ramp_is_one_stage():
  assert ramp.stages(256, 2048) == [ramp.Stage(0, 0, 256, 0)]
  # A ramp starting at the full batch has nothing to ramp.
  assert ramp.stages(256, 2048, 256, 10**9) == [ramp.Stage(0, 0, 256, 0)]
  with pytest.raises(ConfigError):
    ramp.stages(100, 2048, multiple=64)
