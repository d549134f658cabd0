"""Plan a model before running it: parameter counts from shapes alone.

  python -m gpt_jax.plan --config=configs/gpt2_xl.py [--json]

Parameters are counted with `jax.eval_shape` (model.abstract_params), so even
the 1.5B-parameter rung costs no memory and about a second of tracing.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import model as model_lib

# Tables that are looked up rather than multiplied; Kaplan et al. (2020) and
# the PaLM MFU formula count N without them.
EMBEDDINGS = ("wte", "wpe")


def param_counts(model_cfg) -> dict[str, int]:
  """{"params": total, "non_embedding_params": total - wte - wpe} (padded vocab rows included)."""
  shapes = nn.unbox(model_lib.abstract_params(model_cfg))
  total = model_lib.param_count(shapes)
  embedding = sum(int(np.prod(shapes[k].shape)) for k in EMBEDDINGS)
  return {"params": total, "non_embedding_params": total - embedding}


def plan(config) -> dict:
  """What `python -m gpt_jax.plan` prints, as a dict."""
  m = config.model
  start = time.perf_counter()
  counts = param_counts(m)
  return {
    **counts,
    "num_layers": m.num_layers,
    "d_model": m.d_model,
    "num_heads": m.num_heads,
    "mlp_width": m.mlp_ratio * m.d_model,
    "vocab_size": m.vocab_size,
    "embedding_rows": model_lib.padded_vocab_size(m),
    "block_size": m.block_size,
    "eval_shape_seconds": round(time.perf_counter() - start, 3),
  }


def _format(p: dict) -> str:
  shape = (
    f"{p['num_layers']} layers, d_model {p['d_model']}, {p['num_heads']} heads, MLP {p['mlp_width']}, "
    f"vocab {p['vocab_size']} ({p['embedding_rows']} rows), context {p['block_size']}"
  )
  total, non_emb = p["params"], p["non_embedding_params"]
  return "\n".join(
    [
      f"model: {shape}",
      f"params: {total:,} ({total / 1e6:.1f}M)",
      f"non-embedding params: {non_emb:,} ({non_emb / 1e6:.1f}M)",
    ]
  )


def main(argv) -> None:
  from absl import flags

  if len(argv) > 1:
    raise config_lib.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = config_lib.validate(flags.FLAGS.config)
  p = plan(config)
  print(json.dumps(p) if flags.FLAGS.json else _format(p))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  # Defined only when run as a program, so importing plan() defines no flags.
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_xl.py.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
  flags.mark_flag_as_required("config")
  app.run(config_lib.cli_main(main))
