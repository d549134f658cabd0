"""GPT-1 fine-tuning data: input transforms, truncation, records from files and TFDS, packed arrays,
per-process batches, DialoGPT sequences, and config.finetune."""

import json

import numpy as np
import pytest

from configs import debug
from gpt_jax import config as config_lib
from gpt_jax import errors
from gpt_jax import finetune_data as fd

SP = fd.Specials(100, 101, 102)


class NumberTokenizer:
  """Test tokenizer: the text " 5 7 9" is the ids [5, 7, 9]."""

  eot_id = 99
  vocab_size = 100

  def encode(self, text):
    return [int(t) for t in text.split()]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


def ft_config(task, **finetune_fields):
  c = debug.get_config()
  c.job = "finetune"
  c.finetune.update(**{"task": task, "train_path": "train.jsonl", **finetune_fields})
  return c


def encode(task, records, max_len=64, **fields):
  fc = ft_config(task, **fields).finetune
  items = [(f"rows.jsonl:{i + 1}", r) for i, r in enumerate(records)]
  return fd.encode_records(fc, items, NumberTokenizer(), SP, max_len, need_labels=False)


# ------------------------------------------------------------- transforms


def test_transform_layouts_are_exactly_the_documented_ones():
  s, d, e = 100, 101, 102
  enc = encode("classification", [{"text": "1 2 3", "label": 1}])
  assert enc.seqs == [[[s, 1, 2, 3, e]]] and enc.labels == [1]
  enc = encode("entailment", [{"premise": "1 2", "hypothesis": "3", "label": 0}])
  assert enc.seqs == [[[s, 1, 2, d, 3, e]]]
  enc = encode("similarity", [{"text_a": "1 2", "text_b": "3 4 5", "label": 1}])
  assert enc.seqs == [[[s, 1, 2, d, 3, 4, 5, e], [s, 3, 4, 5, d, 1, 2, e]]]
  enc = encode("multiple_choice", [{"context": "7 8", "choices": ["1", "2 3", "4"], "label": 2}])
  assert enc.seqs == [[[s, 7, 8, d, 1, e], [s, 7, 8, d, 2, 3, e], [s, 7, 8, d, 4, e]]]
  assert enc.labels == [2]
  # Custom field names (GLUE style) read the same layout.
  enc = encode("entailment", [{"sentence1": "5", "sentence2": "6"}], fields="sentence1,sentence2")
  assert enc.seqs == [[[s, 5, d, 6, e]]] and enc.labels == [None]


def test_truncation_cuts_the_longest_field_and_keeps_the_documented_side():
  assert fd.fit_lengths([3, 4], 10) == [3, 4]
  assert fd.fit_lengths([2, 20], 10) == [2, 8]
  assert fd.fit_lengths([9, 20], 10) == [5, 5]
  assert fd.fit_lengths([9, 20], 11) == [5, 5]  # Equal fields are cut equally (symmetric).
  s, d, e = 100, 101, 102
  premise, hypothesis = " ".join(map(str, range(1, 11))), " ".join(map(str, range(11, 21)))
  # max_len 9 leaves 6 tokens: 3 each; the premise keeps its end, the hypothesis its start.
  enc = encode("entailment", [{"premise": premise, "hypothesis": hypothesis}], max_len=9)
  assert enc.seqs == [[[s, 8, 9, 10, d, 11, 12, 13, e]]]
  enc = encode("classification", [{"text": premise}], max_len=6)
  assert enc.seqs == [[[s, 1, 2, 3, 4, e]]]
  enc = encode("similarity", [{"text_a": premise, "text_b": "31 32"}], max_len=9)
  assert enc.seqs == [[[s, 1, 2, 3, 4, d, 31, 32, e], [s, 31, 32, d, 1, 2, 3, 4, e]]]
  # Each (context, choice) pair is fitted on its own.
  enc = encode("multiple_choice", [{"context": premise, "choices": ["1", "41 42 43 44 45"]}], max_len=9)
  assert enc.seqs == [[[s, 6, 7, 8, 9, 10, d, 1, e], [s, 8, 9, 10, d, 41, 42, 43, e]]]


def test_records_from_csv_tsv_and_jsonl(tmp_path):
  (tmp_path / "mc.csv").write_text("context,choices_0,choices_1,label\n1 2,3,4 5,1\n")
  fc = ft_config("multiple_choice").finetune
  items = list(fd.read_file(str(tmp_path / "mc.csv")))
  enc = fd.encode_records(fc, items, NumberTokenizer(), SP, 64, need_labels=True)
  assert enc.seqs == [[[100, 1, 2, 101, 3, 102], [100, 1, 2, 101, 4, 5, 102]]] and enc.labels == [1]
  assert enc.where == [f"{tmp_path / 'mc.csv'}:2"]
  (tmp_path / "c.tsv").write_text("sentence\tlabel\n1 2\tpositive\n3\tnegative\n")
  fc = ft_config("classification", fields="sentence", labels="negative,positive").finetune
  enc = fd.encode_records(
    fc, fd.read_file(str(tmp_path / "c.tsv")), NumberTokenizer(), SP, 64, need_labels=True
  )
  assert enc.labels == [1, 0]
  fc = ft_config("similarity", regression=True).finetune
  rows = [("x:1", {"text_a": "1", "text_b": "2", "label": "3.5"})]
  assert fd.encode_records(fc, rows, NumberTokenizer(), SP, 64, need_labels=True).labels == [3.5]


def test_tfds_records_are_decoded_and_unlabelled_rows_marked(monkeypatch):
  """The TFDS path on a stand-in data source (GLUE itself cannot be downloaded here)."""
  import tensorflow_datasets as tfds

  records = [
    {"sentence1": b"1 2", "sentence2": b"3", "label": np.int64(1), "idx": np.int32(0)},
    {"sentence1": b"4", "sentence2": b"5 6", "label": np.int64(-1), "idx": np.int32(1)},
  ]

  class Source:
    def __len__(self):
      return len(records)

    def __getitems__(self, keys):
      return [records[k] for k in keys]

  class Builder:
    info = type("Info", (), {"splits": {"train": None, "validation": None}})()

    def is_prepared(self):
      return True

    def as_data_source(self, split):
      assert split == "validation"
      return Source()

  monkeypatch.setattr(tfds, "builder", lambda name, **kw: Builder())
  fc = ft_config("entailment", tfds_name="glue/rte", fields="sentence1,sentence2", train_path="").finetune
  items = fd.read_split(fc, "eval")
  assert [w for w, _ in items] == ["tfds:glue/rte:validation record 0", "tfds:glue/rte:validation record 1"]
  enc = fd.encode_records(fc, items, NumberTokenizer(), SP, 64, need_labels=False)
  assert enc.seqs == [[[100, 1, 2, 101, 3, 102]], [[100, 4, 101, 5, 6, 102]]] and enc.labels == [1, None]


@pytest.mark.parametrize(
  "line, message",
  [
    ('{"text": "1", "label": 7}', "rows.jsonl:2: label 7 is out of range for 2 classes"),
    ('{"txt": "1", "label": 1}', "rows.jsonl:2: no field 'text'"),
    ('{"text": "1", "label": "maybe"}', "rows.jsonl:2: label 'maybe' is not an integer index"),
    ('{"text": "1"}', "rows.jsonl:2: no label"),
    ("{oops", "rows.jsonl:2: invalid JSON"),
  ],
)
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"text": "1", "label": 0}\n' + line + "\n")
  fc = ft_config("classification").finetune
  with pytest.raises(errors.UserError) as err:
    fd.encode_records(fc, fd.read_file(str(path)), NumberTokenizer(), SP, 64, need_labels=True)
  assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(task="tagging"), "config.finetune.task='tagging' is invalid"),
    (dict(train_path=""), "config.finetune.train_path='' is invalid"),
    (dict(num_classes=1), "config.finetune.num_classes=1 is invalid"),
    (dict(task="multiple_choice", regression=True), "config.finetune.regression=True is invalid"),
    (dict(best_metric="f1", num_classes=3), "config.finetune.best_metric='f1' is invalid"),
    (dict(head_dropout=1.0), "config.finetune.head_dropout=1.0 is invalid"),
    (dict(task="dialogue", train_path="d.csv"), "config.finetune.train_path='d.csv' is invalid"),
    (dict(task="dialogue", train_path="d.jsonl", loss_turns="first"), "config.finetune.loss_turns='first'"),
  ],
)
def test_config_errors_name_the_dotted_field(fields, message):
  c = ft_config("classification")
  c.finetune.update(**fields)
  with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    config_lib.validate(c)


# -------------------------------------------------------- DialoGPT sequences

EOT = 9


def test_dialogue_loss_covers_only_the_response_turns():
  turns = [[1, 2], [3], [4, 5]]
  tokens, mask = fd.dialogue_sequence(turns, EOT, max_len=32, loss_turns="last", reverse=False)
  assert tokens == [9, 1, 2, 9, 3, 9, 4, 5, 9]
  # mask[j] says whether tokens[j + 1] is trained: the last turn and its <|endoftext|>.
  assert [t for t, m in zip(tokens[1:], mask) if m] == [4, 5, 9]
  assert len(mask) == len(tokens) - 1
  tokens, mask = fd.dialogue_sequence(turns, EOT, max_len=32, loss_turns="all", reverse=False)
  assert [t for t, m in zip(tokens[1:], mask) if m] == [3, 9, 4, 5, 9]


def test_backward_data_is_the_reversed_dialogue():
  turns = [[1, 2], [3], [4, 5]]
  tokens, mask = fd.dialogue_sequence(turns, EOT, max_len=32, loss_turns="all", reverse=True)
  assert tokens == [9, 4, 5, 9, 3, 9, 1, 2, 9]
  # P(source | response): everything after the (last, now first) response is trained.
  assert [t for t, m in zip(tokens[1:], mask) if m] == [3, 9, 1, 2, 9]


def test_long_dialogues_drop_their_oldest_turns_first():
  turns = [[1, 1, 1], [2, 2], [3], [4, 4]]
  tokens, mask = fd.dialogue_sequence(turns, EOT, max_len=8, loss_turns="last", reverse=False)
  assert tokens == [9, 2, 2, 9, 3, 9, 4, 4, 9]
  tokens, _ = fd.dialogue_sequence(turns, EOT, max_len=5, loss_turns="last", reverse=False)
  assert tokens == [9, 3, 9, 4, 4, 9]
  # Two turns stay; what still does not fit is cut from the start (the end, reversed).
  tokens, mask = fd.dialogue_sequence(turns, EOT, max_len=4, loss_turns="last", reverse=False)
  assert tokens == [3, 9, 4, 4, 9] and mask == [0, 1, 1, 1]
  tokens, _ = fd.dialogue_sequence(turns, EOT, max_len=4, loss_turns="all", reverse=True)
  assert tokens == [9, 4, 4, 9, 3]


# ------------------------------------------------------------------ arrays


def test_pack_pads_sequences_and_marks_missing_choices_and_labels():
  enc = fd.Encoded(seqs=[[[1, 2, 3]], [[4], [5, 6]]], labels=[2, None], where=["a:1", "a:2"])
  arrays = fd.pack(enc, seq_len=8, num_seqs=2, regression=False)
  assert arrays["tokens"].shape == (2, 2, 8) and arrays["tokens"].dtype == np.uint16  # Half the memory.
  np.testing.assert_array_equal(arrays["tokens"][0, 0], [1, 2, 3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(arrays["tokens"][1, 1], [5, 6, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(arrays["lengths"], [[3, 0], [1, 2]])  # 0: no such sequence.
  np.testing.assert_array_equal(arrays["label"], [2, -1])  # -1: unlabelled.
  regression = fd.pack(fd.Encoded([[[70_000]]], [None], ["b:1"]), 4, 1, regression=True)
  assert regression["tokens"].dtype == np.int32 and np.isnan(regression["label"][0])


@pytest.mark.parametrize(
  "longest, cap, padded", [(1, 64, 8), (8, 64, 8), (9, 64, 16), (60, 64, 64), (70, 64, 64)]
)
def test_round_len(longest, cap, padded):
  assert fd.round_len(longest, cap) == padded


def _arrays(n):
  return {"tokens": np.arange(n * 3, dtype=np.uint16).reshape(n, 3), "label": np.arange(n, dtype=np.int32)}


def test_an_array_source_hands_out_int32_rows_with_their_index():
  row = fd.ArraySource(_arrays(4))[2]
  assert row["tokens"].dtype == np.int32 and row["tokens"].tolist() == [6, 7, 8]
  assert row["label"] == 2 and row["index"] == 2 and len(fd.ArraySource(_arrays(4))) == 4


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_row_once_and_weigh_padding_zero(process_count):
  arrays = _arrays(6)
  per_process = [
    fd.eval_batches(arrays, batch_size=4, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  assert all(len(b) == 2 for b in per_process)  # ceil(6 / 4) global batches.
  index = np.concatenate([b["index"] for bs in per_process for b in bs])
  weight = np.concatenate([b["weight"] for bs in per_process for b in bs])
  assert sorted(index[weight == 1]) == list(range(6)) and set(index[weight == 0]) == {-1}
  for bs in per_process:
    for b in bs:
      real = b["weight"] == 1
      np.testing.assert_array_equal(b["label"][real], b["index"][real])
      assert not b["tokens"][~real].any() and b["tokens"].dtype == np.int32
  with pytest.raises(errors.UserError, match=r"^eval batch size 6 must be divisible by the 4 processes$"):
    fd.eval_batches(arrays, batch_size=6, process_index=0, process_count=4)


# ------------------------------------------------------------ DialoGPT files


def test_turns_are_joined_by_end_of_text():
  assert fd.join_turns([[1, 2], [3]], EOT) == [9, 1, 2, 9, 3, 9]


def test_dialogue_files(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"turns": t}) + "\n" for t in (["hi ", " there"], ["a", "b", "c"])))
  assert fd.read_dialogues(str(path)) == [(f"{path}:1", ["hi", "there"]), (f"{path}:2", ["a", "b", "c"])]
  assert len(fd.read_dialogues(str(path), max_examples=1)) == 1
  for record, message in (
    ({"turns": ["only one"]}, ":1: a dialogue needs at least 2 turns, got 1"),
    ({"turns": "hi"}, ':1: expected a "turns" list of strings'),
    ({"turns": ["a", 3]}, ':1: expected a "turns" list of strings'),
  ):
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(errors.UserError, match=message):
      fd.read_dialogues(str(path))
  with pytest.raises(errors.UserError, match=r"d.csv: dialogue data must be a .jsonl file"):
    fd.read_dialogues(str(tmp_path / "d.csv"))
