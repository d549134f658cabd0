"""Loading a model from a params export, a training workdir / step, or a Hugging Face folder."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec

from gpt_jax import checkpoint, loading, model, model_config, paths, sharding
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import UserError


def _params(m, seed=0):
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(model.abstract_params(m))
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_bpe(["to be or not to be, that is the question"] * 4, 300)


@pytest.fixture
def workdir(debug_config, tmp_path, tok):
  """A training workdir: config.json, tokenizer/, checkpoints/3/state with params and optimiser state."""
  params = _params(debug_config.model)
  root = tmp_path / "work"
  root.mkdir()
  paths.write_config(root / paths.CONFIG_FILE, debug_config)
  tok.save(str(root / "tokenizer"))
  manager = checkpoint.make_manager(str(root), debug_config)
  opt = jax.tree.map(lambda x: x * 0 + 7, params)
  checkpoint.save(manager, 3, {"params": params, "opt_state": {"mu": opt}}, None, {"step": 3}, force=True)
  manager.wait_until_finished()
  return root, params


def test_params_export(debug_config, tmp_path, tok):
  params = _params(debug_config.model, seed=1)
  checkpoint.save_params(tmp_path / "export", debug_config, params, tokenizer=tok)
  config, got = loading.load_params(str(tmp_path / "export"))
  assert config.to_dict() == debug_config.to_dict()
  _same(got, params)
  assert not loading.is_hf_dir(tmp_path / "export")


def test_training_workdir_and_step_dir_give_the_params_alone(workdir, debug_config):
  root, params = workdir
  config, got = loading.load_params(str(root))
  assert config.to_dict() == debug_config.to_dict()
  _same(got, params)  # Only the params: the optimiser state is not read.
  config, got = loading.load_params(str(root / "checkpoints" / "3"))  # Config from the workdir above.
  assert config.model.d_model == debug_config.model.d_model
  _same(got, params)


def test_restore_onto_given_shardings(workdir, debug_config):
  root, params = workdir
  debug_config.mesh.update(data=1, fsdp=8)  # The embed dimension split 8 ways.
  mesh = sharding.make_mesh(debug_config.mesh)
  specs = model.logical_specs(debug_config.model)
  shardings = sharding.logical_to_shardings(specs, params, mesh, sharding.rules(debug_config))
  _, got = loading.load_params(str(root), shardings=shardings)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, got, shardings)))
  assert got["wte"].sharding.spec == PartitionSpec("tensor", "fsdp")  # (vocab, embed): base.py rules.
  _same(jax.device_get(got), params)


def test_inference_loads_a_model_config_params_and_the_tokenizer(workdir, debug_config, tok):
  root, params = workdir
  m, got, got_tok = loading.load_for_inference(str(root))
  assert isinstance(m, model_config.ModelConfig) and m == model_config.of(debug_config.model)
  assert got_tok.fingerprint == tok.fingerprint
  # Sharded over every device by the run's mesh rules (8 fake CPU devices here).
  wte = got["wte"]
  assert isinstance(wte.sharding, NamedSharding) and wte.sharding.mesh.devices.size == len(jax.devices())
  _same(jax.device_get(got), params)


def test_a_workdir_without_a_tokenizer_is_one_line(workdir):
  root, _ = workdir
  shutil.rmtree(root / "tokenizer")
  with pytest.raises(UserError) as e:
    loading.load_for_inference(str(root))
  assert str(e.value) == f"{root} has no tokenizer/ folder"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
  path = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=2, n_head=2)
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  hf.save_pretrained(path, safe_serialization=True)
  tok.save(str(path))  # vocab.json + merges.txt beside the weights.
  return path, hf


def test_hugging_face_folder(hf_dir, tok):
  path, hf = hf_dir
  assert loading.is_hf_dir(path)
  config, params = loading.load_params(str(path))
  assert (config.model.num_layers, config.model.d_model, config.model.vocab_size) == (2, 16, tok.vocab_size)
  assert config.job == "pretrain"  # A full config (configs/base.py) around the folder's model section.
  np.testing.assert_array_equal(params["wte"], hf.transformer.wte.weight.detach().numpy())
  np.testing.assert_array_equal(params["wpe"], hf.transformer.wpe.weight.detach().numpy())
  m, _, got_tok = loading.load_for_inference(hf_dir=str(path))
  assert m.d_model == 16 and got_tok.encode("to be") == tok.encode("to be")
  # Given as --workdir (an export of ours, say), the folder is read as one, tokenizer included.
  m2, params2, tok2 = loading.load_for_inference(workdir=str(path))
  assert m2 == m and tok2.fingerprint == got_tok.fingerprint
  np.testing.assert_array_equal(params2["wte"], params["wte"])


def test_is_hf_dir(tmp_path):
  assert not loading.is_hf_dir(tmp_path)  # No config.json.
  (tmp_path / "config.json").write_text("{broken")
  assert not loading.is_hf_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model": {"d_model": 8}}))
  assert not loading.is_hf_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"n_embd": 8}))
  assert loading.is_hf_dir(tmp_path)


def _refused(fn, match, *args, **kwargs):
  with pytest.raises(UserError, match=match) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)


def test_refusals_are_one_line(tmp_path, debug_config, hf_dir):
  one_of = r"^give exactly one of --workdir or --hf_dir$"
  _refused(loading.load_for_inference, one_of)
  _refused(loading.load_for_inference, one_of, workdir=str(tmp_path), hf_dir=str(hf_dir[0]))
  not_hf = r"is not a Hugging Face GPT-2 folder \(config.json with n_embd\)$"
  _refused(loading.load_for_inference, not_hf, hf_dir=str(tmp_path))
  _refused(
    loading.load_params, rf"^checkpoint path {tmp_path / 'nope'} does not exist$", str(tmp_path / "nope")
  )
  no_config = rf"^{tmp_path} has no config.json: not a gpt_jax workdir or params export$"
  _refused(loading.load_params, no_config, str(tmp_path))
  paths.write_config(tmp_path / "config.json", debug_config)
  no_step = rf"^{tmp_path} has no finalised checkpoint \(expected checkpoints/<step>/state or params/\)$"
  _refused(loading.load_params, no_step, str(tmp_path))


def test_a_bucket_is_no_hugging_face_folder(bucket):
  _refused(loading.load_for_inference, r"^--hf_dir=gs://b/x: must be a local folder", hf_dir="gs://b/x")
