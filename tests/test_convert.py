"""The Hugging Face import / export command line (convert.py); the library is tested in test_hf.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_hf import _make_hf

from gpt_jax import convert, loading
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  return path, _make_hf(path)


def test_import_and_export_carry_the_folders_tokenizer(tmp_path, capsys):
  tok = tok_lib.train_bpe(["to be or not to be, that is the question"] * 4, 300)
  src = tmp_path / "src"
  _make_hf(src, n_layer=1, vocab_size=tok.vocab_size)
  tok.save(str(src))  # vocab.json + merges.txt beside the weights.
  convert._import(str(src), str(tmp_path / "ckpt"), scan_layers=True)
  assert f"its tokenizer ({src}/vocab.json + merges.txt)" in capsys.readouterr().out
  config, params = loading.load_params(str(tmp_path / "ckpt"))
  assert config.model.scan_layers and "blocks" in params
  # Not the GPT-2 vocabulary: the run records where its files are.
  assert config.data.tokenizer == "gpt2" and config.data.tokenizer_path == str(src.resolve())
  assert tok_lib.load_dir(str(tmp_path / "ckpt" / "tokenizer")).fingerprint == tok.fingerprint
  convert._export(str(tmp_path / "ckpt"), str(tmp_path / "out"), None)
  assert f"with the tokenizer files of {tmp_path / 'ckpt' / 'tokenizer'}" in capsys.readouterr().out
  assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == json.loads(
    (src / "vocab.json").read_text()
  )
  original, exported = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
  assert sorted(exported) == sorted(original)
  assert all(np.array_equal(exported[k], v) for k, v in original.items())


def test_without_tokenizer_files_nothing_is_guessed(hf_model, tmp_path, capsys):
  path, _ = hf_model  # Vocabulary 1000 and no vocab.json: neither its own nor GPT-2's files fit.
  convert._import(str(path), str(tmp_path / "ckpt"), scan_layers=False)
  assert "no tokenizer (the folder has no vocab.json + merges.txt)" in capsys.readouterr().out
  assert not (tmp_path / "ckpt" / "tokenizer").exists()
  convert._export(str(tmp_path / "ckpt"), str(tmp_path / "out"), None)
  assert capsys.readouterr().out.endswith("without tokenizer files (pass --tokenizer_dir)\n")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_import_refuses_a_non_empty_output_before_reading(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="refusing to overwrite"):
    convert._import(str(tmp_path / "no_such_folder"), str(tmp_path / "ckpt"), scan_layers=False)
  assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_cli_round_trip(hf_model, tmp_path):
  pytest.importorskip("gpt_jax.checkpoint")
  path, _ = hf_model
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"

  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "gpt_jax.convert", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )

  r = run(f"--hf_dir={path}", f"--out={ckpt}", "--scan_layers")
  assert r.returncode == 0, r.stderr
  r = run(f"--ckpt={ckpt}", f"--to_hf={out}")
  assert r.returncode == 0, r.stderr
  original, exported = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
  assert sorted(exported) == sorted(original)
  assert all(np.array_equal(exported[k], v) for k, v in original.items())
  # Refuses to overwrite, with one line on stderr and exit code 2.
  r = run(f"--ckpt={ckpt}", f"--to_hf={out}")
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "refusing to overwrite" in r.stderr, r.stderr
  # Only the checkpoint may be in a bucket; nothing is written for a URL output.
  r = run(f"--ckpt={ckpt}", "--to_hf=gs://bkt/hf")
  assert r.returncode == 2 and r.stderr == "error: --to_hf=gs://bkt/hf: must be a local folder\n", r.stderr
  assert not (ROOT / "gs:").exists()
