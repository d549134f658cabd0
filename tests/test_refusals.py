"""A refused command changes nothing: every check that can refuse a run happens before anything is
written, so the workdir (config.json, tokenizer/, data/, checkpoints/) stays byte-identical."""

import hashlib
import json
import os

import pytest

from configs import debug
from gpt_jax import config as config_lib
from gpt_jax import finetune, pretrain
from gpt_jax.errors import UserError


def tree_hash(root) -> dict[str, str]:
  """{relative path: sha256} of every file and folder under root (the JAX compilation cache aside)."""
  out = {}
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d != "jax_cache"]
    rel = os.path.relpath(folder, root)
    out[rel + "/"] = "dir"
    for f in files:
      with open(os.path.join(folder, f), "rb") as fh:
        out[os.path.normpath(os.path.join(rel, f))] = hashlib.sha256(fh.read()).hexdigest()
  return out


def small_config(tmp_path, **changes):
  c = debug.get_config()
  c.data.max_documents = 12
  c.train.update(num_steps=2, compilation_cache_dir=str(tmp_path / "jax_cache"))
  c.checkpoint.every_steps = 2
  c.eval.update(every_steps=0, num_batches=1)
  c.log.tensorboard = False
  c.sample.num_samples = 0
  for dotted, value in changes.items():
    section, field = dotted.split("__")
    c[section][field] = value
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("refusals")
  pretrain.run(config_lib.validate(small_config(root)), str(root / "run"))
  return root


def _refused(config, workdir, match):
  with pytest.raises(UserError, match=match) as e:
    pretrain.run(config_lib.validate(config), str(workdir))
  assert "\n" not in str(e.value)


# (overrides, expected error): each refused by a different check.
ON_A_TRAINED_WORKDIR = {
  "mesh": (
    {"mesh__data": 3},
    r"config.mesh data\*fsdp\*tensor = 3\*1\*1 = 3 must equal the number of devices",
  ),
  "batch": (
    {"train__batch_size": 12},
    r"12 sequences per microbatch must be divisible by mesh data\*fsdp = 8",
  ),
  "model shape": ({"model__d_model": 64}, r"holds a run with another model shape \(model.d_model"),
  "tokenizer": ({"data__tokenizer": "gpt2"}, "tokenizer"),
  "data source": ({"data__source": "files", "data__paths": "/no/such/*.txt"}, "no/such"),
  "eval task file": ({"eval__tasks": ("perplexity:/no/such.jsonl",)}, "no such file /no/such.jsonl"),
  "sample length": ({"sample__num_samples": 1, "sample__max_new_tokens": 32}, "sample.max_new_tokens=32"),
}


@pytest.mark.parametrize("name", list(ON_A_TRAINED_WORKDIR))
def test_refused_resumes_leave_the_workdir_byte_identical(trained, name):
  changes, match = ON_A_TRAINED_WORKDIR[name]
  before = tree_hash(trained / "run")
  assert "config.json" in before and "tokenizer/gpt_jax_tokenizer.json" in before
  _refused(small_config(trained, **changes), trained / "run", match)
  assert tree_hash(trained / "run") == before


ON_A_FRESH_WORKDIR = {
  "init_from missing": (
    {"root__init_from": "/no/such/run"},
    "config.init_from='/no/such/run' does not exist",
  ),
  "init_from shape": ({"root__init_from": "TRAINED", "model__num_layers": 3}, "another model shape"),
  "vocabulary": ({"data__tokenizer": "gpt2"}, "the tokenizer has 50257 ids but config.model.vocab_size=320"),
  "data source": ({"data__source": "files", "data__paths": "/no/such/*.txt"}, "no/such"),
}


@pytest.mark.parametrize("name", list(ON_A_FRESH_WORKDIR))
def test_refused_fresh_runs_write_nothing(trained, tmp_path, name):
  changes, match = dict(ON_A_FRESH_WORKDIR[name][0]), ON_A_FRESH_WORKDIR[name][1]
  init_from = changes.pop("root__init_from", None)
  config = small_config(tmp_path, **changes)
  if init_from:
    config.init_from = str(trained / "run") if init_from == "TRAINED" else init_from
  workdir = tmp_path / "fresh"
  _refused(config, workdir, match)
  assert not workdir.exists() or tree_hash(workdir) == {"./": "dir"}


def test_a_refused_fine_tune_writes_nothing(trained, tmp_path):
  (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "label": 0}) + "\n" + "{broken\n")
  c = small_config(tmp_path)
  c.job = "finetune"
  c.init_from = str(trained / "run")
  c.finetune.update(task="classification", train_path=str(tmp_path / "train.jsonl"))
  workdir = tmp_path / "clf"
  with pytest.raises(UserError, match=r"train.jsonl:2: invalid JSON"):
    finetune.run(config_lib.validate(c), str(workdir))
  assert not workdir.exists()


def test_a_run_refused_for_its_data_pins_no_tokenizer(tmp_path):
  """The GPT-2 BPE needs no documents, so the data is first read while the token cache is built:
  a bad line refuses the run there, and the tokenizer was never written to the workdir."""
  (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "to be or not to be"}) + "\n{broken\n")
  config = small_config(tmp_path, data__tokenizer="gpt2", model__vocab_size=50257)
  config.data.update(source="files", paths=str(tmp_path / "corpus.jsonl"))  # Its cache in <workdir>/data.
  _refused(config, tmp_path / "fresh", r"corpus.jsonl:2")
  assert not (tmp_path / "fresh").exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # The build's tmp folder went.


def test_a_corpus_too_short_to_train_on_is_refused_before_its_cache_is_published(tmp_path):
  (tmp_path / "corpus.jsonl").write_text(
    json.dumps({"text": "to be"}) + "\n" + json.dumps({"text": "or not"})
  )
  config = small_config(tmp_path, data__tokenizer="gpt2", model__vocab_size=50257)
  config.data.update(source="files", paths=str(tmp_path / "corpus.jsonl"), val_fraction=0.5)
  _refused(config, tmp_path / "fresh", r"the training split has \d tokens, fewer than one window")
  assert not (tmp_path / "fresh").exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
