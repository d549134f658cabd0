# ruff: noqa: E501 - HLO lines are as long as the compiler writes them.
"""roofline.py: collectives read from compiled HLO text (loop trip counts, group sizes, async ops,
multi-slice transfers) and the step-time bounds they give."""

import pytest

from gpt_jax import hardware, roofline

# A hand-written miniature of TPU HLO text: a 12-trip layer loop whose body all-gathers a weight
# (async) over 4 chips and all-reduces activations over the mesh axes 0 and 1 (2 x 4 = 8 chips),
# plus an all-reduce outside the loop and a megascale cross-slice transfer.
HLO = """HloModule jit_train_step

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %gte = s32[] get-tuple-element(%p), index=0
  %constant.1 = s32[] constant(12)
  ROOT %lt = pred[] compare(%gte, %constant.1), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ag = (bf16[256,64]{1,0}, bf16[1024,64]{1,0}) all-gather-start(%w), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar = f32[128,32]{1,0:T(8,128)} all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_0','axis_1'}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %y)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %ar2 = f32[1000]{0} all-reduce(%g), replica_groups=[1,8]<=[8], to_apply=%add
  %s = (f32[2048]{0}, u32[], token[]) send(%v, %tok), channel_id=5, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[8] copy(%a)
}
"""


def test_collectives_count_loop_trips_groups_and_slices():
  c = roofline.collectives(HLO, num_slices=2)
  gathered = 1024 * 64 * 2  # The async start's largest buffer: the gathered result.
  assert c["all-gather"] == {"count": 12, "bytes": 12 * gathered, "wire_bytes": 12 * gathered * 3 / 4}
  inner, outer = 128 * 32 * 4, 1000 * 4
  assert c["all-reduce"]["count"] == 13
  assert c["all-reduce"]["bytes"] == 12 * inner + outer
  assert c["all-reduce"]["wire_bytes"] == pytest.approx(12 * inner * 2 * 7 / 8 + outer * 2 * 7 / 8)
  # Across 2 slices a ring all-reduce sends 2 (n - 1) / n = 1 x the buffer.
  assert c["dcn"] == {"count": 1, "bytes": 2048 * 4, "wire_bytes": 2048 * 4 * 1.0}


def test_estimate_takes_the_slowest_resource():
  chip = hardware.TPUS["v5e"]
  est = roofline.estimate(chip, flops=chip.peak_flops, hbm_bytes=chip.hbm_bandwidth * 2, model_flops=0.5e12)
  assert est["bound"] == "hbm" and est["step_seconds"] == pytest.approx(2.0)
  assert est["mfu_bound"] == pytest.approx(0.5e12 / (2.0 * chip.peak_flops))
  est = roofline.estimate(chip, flops=1.0, hbm_bytes=1.0, model_flops=1.0, dcn_bytes=chip.dcn_bandwidth * 3)
  assert est["bound"] == "dcn" and est["seconds"]["dcn"] == pytest.approx(3.0)
  assert est["assumptions"]["ici_bandwidth"] == chip.interconnect_bandwidth
