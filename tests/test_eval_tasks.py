"""Evaluation task kinds: specs, JSONL / TFDS records, few-shot draws, scoring windows, metrics."""

import math

import numpy as np
import pytest

from gpt_jax import errors, eval_tasks

# ----------------------------------------------------------------- windows


@pytest.mark.parametrize("n,block,stride", [(2, 4, 2), (5, 4, 4), (40, 8, 3), (41, 8, 8), (9, 8, 1)])
def test_rolling_windows_score_each_token_once_with_longest_context(n, block, stride):
  tokens = list(range(100, 100 + n))
  windows = eval_tasks.rolling_windows(tokens, block, stride)
  predicted = [t for _, cont in windows for t in cont]
  assert predicted == tokens[1:]
  for ctx, cont in windows:
    assert ctx == tokens[: tokens.index(cont[0])][-len(ctx) :]  # context is what immediately precedes
    # The model sees block tokens, or every earlier token when there are fewer.
    assert len(ctx) + len(cont) - 1 == min(block, tokens.index(cont[-1]))


# ---------------------------------------------------------------- few-shot


def test_fewshot_never_draws_the_item_and_seeds_differ():
  pool = [{"text": f"t{i}"} for i in range(30)]
  draws = {
    seed: [eval_tasks.draw_shots(pool, 5, seed, i, i, it) for i, it in enumerate(pool)] for seed in (0, 1)
  }
  for per_item in draws.values():
    for i, shots in enumerate(per_item):
      assert len(shots) == 5 and pool[i] not in shots and len({s["text"] for s in shots}) == 5
  assert draws[0] != draws[1]
  # A separate pool (e.g. --fewshot_file) excludes copies of the item by content.
  assert all(s != pool[3] for _ in range(5) for s in eval_tasks.draw_shots(pool, 29, 0, 3, None, pool[3]))
  with pytest.raises(errors.UserError, match="num_fewshot=30: item 0 has only 29"):
    eval_tasks.draw_shots(pool, 30, 0, 0, 0, pool[0])


# ----------------------------------------------------------------- metrics


def test_stderr_formulas_on_known_cases():
  assert eval_tasks.mean_stderr([1, 0, 1, 1]) == pytest.approx((0.75, 0.25))  # std 0.5, sqrt(4) = 2
  assert math.isnan(eval_tasks.mean_stderr([1.0])[1])
  # Ratio 6 / 2 = 3; residuals (-1, 1); sqrt(2 / 1 / 2) / mean(den) = 1.
  assert eval_tasks.ratio_stderr([2, 4], [1, 1]) == pytest.approx((3.0, 1.0))
  # Delta method vs a large fixed-seed bootstrap over documents.
  rng = np.random.default_rng(0)
  den = rng.integers(5, 50, size=200).astype(float)
  num = den * rng.normal(3.0, 0.5, size=200)
  ratio, se = eval_tasks.ratio_stderr(num, den)
  boot = [num[i].sum() / den[i].sum() for i in rng.integers(0, 200, size=(2000, 200))]
  assert se == pytest.approx(np.std(boot), rel=0.1)
  assert ratio == pytest.approx(num.sum() / den.sum())


def test_squad_normalisation_and_f1():
  assert eval_tasks.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert eval_tasks.exact_match("an apple", ["Apple.", "pear"]) == 1.0
  assert eval_tasks.f1("red blue", ["blue green", "yellow"]) == pytest.approx(0.5)
  assert eval_tasks.f1("the", ["a"]) == 1.0  # both empty after normalisation


# ------------------------------------------------------------------- specs


def test_parse_spec():
  p = eval_tasks.parse_spec
  assert p("perplexity:/data/wiki.test.jsonl") == eval_tasks.TaskSpec(
    "perplexity", "wiki.test", "/data/wiki.test.jsonl"
  )
  assert p("last_word:tfds:lambada") == eval_tasks.TaskSpec("last_word", "lambada", tfds_name="lambada")
  s = p("perplexity:tfds:c4/en:3.1.0:validation")
  assert (s.name, s.tfds_name, s.split) == ("c4_en", "c4/en:3.1.0", "validation")
  s = p("multiple_choice:tfds:glue/rte")
  assert (s.name, s.tfds_name, s.split) == ("glue_rte", "glue/rte", "")
  assert p("perplexity:tfds:c4/en:3.1.0").split == ""
  assert p("multiple_choice:tfds:hellaswag:train").split == "train"


def test_tfds_field_maps():
  p = eval_tasks.parse_spec
  hs = eval_tasks.TFDS_TASKS["hellaswag"].to_record(
    {
      "activity_label": b"Removing ice from car",
      "context": b"Then, the man writes over the snow. [header] He",
      "endings": np.array([b"stops.", b"goes [title] on."], dtype=object),
      "label": np.int32(1),
    }
  )
  assert hs == {
    "context": "Removing ice from car: Then, the man writes over the snow. He",
    "choices": [" stops.", " goes. on."],
    "label": 1,
  }
  assert eval_tasks.TFDS_TASKS["piqa"].to_record({"goal": b"g", "sol1": b"a", "sol2": b"b", "label": 1}) == {
    "context": "Question: g\nAnswer:",
    "choices": [" a", " b"],
    "label": 1,
  }
  wg = eval_tasks.TFDS_TASKS["winogrande"].to_record(
    {
      "sentence": b"The cup fit in the box because _ was big.",
      "option1": b"the cup",
      "option2": b"the box",
      "label": 1,
    }
  )
  assert wg == {
    "contexts": ["The cup fit in the box because the cup", "The cup fit in the box because the box"],
    "continuation": " was big.",
    "label": 1,
  }
  assert eval_tasks.TFDS_TASKS["lambada"].to_record({"passage": b"a b c"}) == {"text": "a b c"}
  # GPT-3 draws LAMBADA shots from the development set: TFDS's lambada "train".
  assert (eval_tasks.TFDS_TASKS["lambada"].split, eval_tasks.TFDS_TASKS["lambada"].fewshot_split) == (
    "test",
    "train",
  )
  rte = eval_tasks.tfds_mapping(p("multiple_choice:tfds:glue/rte:1.0.0"))
  assert rte.split == "validation" and rte.to_record(
    {"sentence1": b"A man sleeps. ", "sentence2": b"Someone rests.", "label": np.int64(0), "idx": 3}
  ) == {
    "context": "A man sleeps.\nQuestion: Someone rests. True or False?\nAnswer:",
    "choices": [" True", " False"],
    "label": 0,
  }
  mnli = eval_tasks.tfds_mapping(p("multiple_choice:tfds:glue/mnli"))
  assert mnli.split == "validation_matched"
  assert mnli.to_record({"premise": b"p", "hypothesis": b"h", "label": 2})["choices"][2] == " False"
  assert eval_tasks.tfds_mapping(p("multiple_choice:tfds:glue/sst2")).to_record(
    {"sentence": b"great fun", "label": 1}
  )["choices"] == [" negative", " positive"]
  assert eval_tasks.tfds_mapping(p("multiple_choice:tfds:glue/cola")) is None  # Unmapped: our field names.
  for name, kind in (
    ("hellaswag", "multiple_choice"),
    ("winogrande", "multiple_choice"),
    ("lambada", "last_word"),
  ):
    assert eval_tasks.normalize_item(
      kind, {"hellaswag": hs, "winogrande": wg, "lambada": {"text": "a b"}}[name], "x"
    )


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
  "kind,content,message",
  [
    (
      "multiple_choice",
      '{"context": "a", "choices": ["b"], "label": 0}\n{"context": "a",\n',
      r"x.jsonl:2: malformed",
    ),
    ("multiple_choice", '{"choices": ["b"], "label": 0}\n', r"x.jsonl:1: missing field 'context'"),
    (
      "multiple_choice",
      '{"context": "a", "choices": ["b", "c"], "label": 2}\n',
      r":1: label 2 is out of range",
    ),
    (
      "multiple_choice",
      '{"context": "a", "choices": [], "label": 0}\n',
      r":1: field 'choices' must be a non-empty",
    ),
    ("multiple_choice", '{"context": "a", "choices": ["b"], "label": true}\n', r"'label' must be an integer"),
    ("generate", '\n{"context": "a", "answers": "b"}\n', r"x.jsonl:2: field 'answers'"),
    ("last_word", '{"text": "  "}\n', r":1: field 'text' has no word"),
    ("perplexity", '["text"]\n', r":1: expected a JSON object"),
    ("perplexity", "", r"x.jsonl: no items"),
    ("perplexity", None, r"x.jsonl:2: not UTF-8 \(byte 14 of the line\)"),
  ],
)
def test_bad_task_files(tmp_path, kind, content, message):
  if content is None:  # Bytes that are not UTF-8 on line 2.
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(errors.UserError, match=message):
      eval_tasks.load_jsonl(str(tmp_path / "x.jsonl"), kind)
    return
  path = tmp_path / "x.jsonl"
  path.write_text(content)
  with pytest.raises(errors.UserError, match=message):
    eval_tasks.load_jsonl(str(path), kind)


def test_bad_specs():
  with pytest.raises(errors.UserError, match="unknown task kind 'ranking'"):
    eval_tasks.parse_spec("ranking:/x.jsonl")
  with pytest.raises(errors.UserError, match="expected KIND:PATH"):
    eval_tasks.parse_spec("perplexity")
  with pytest.raises(errors.UserError, match="/nope.jsonl: no such file"):
    eval_tasks.load_jsonl("/nope.jsonl", "perplexity")


def test_last_word_and_pair_splits():
  assert eval_tasks.last_word_split("He took his  keys.\n") == ("He took his", " keys.")
  # BPE tokens carry their leading space: the context's trailing space moves to the continuation.
  assert eval_tasks.split_pair("The capital is ", "Paris") == ("The capital is", " Paris")
  assert eval_tasks.split_pair("Q:\n", "A") == ("Q:", "\nA")
  assert eval_tasks.join_answer("Q: x? A:", "yes") == "Q: x? A: yes"
  assert eval_tasks.join_answer("Q: x? A: ", "yes") == "Q: x? A: yes"
  assert eval_tasks.join_answer("Q:", " yes") == "Q: yes"


def test_solved_examples_and_the_prompt_prefix():
  mc = {"contexts": ["a", "b"], "continuations": [" x", " y"], "label": 1}
  assert eval_tasks.solved("multiple_choice", mc) == "b y"
  assert eval_tasks.solved("last_word", {"text": "to be  "}) == "to be"
  assert eval_tasks.solved("generate", {"context": "Q:", "answers": ["A", "B"]}) == "Q: A"
  with pytest.raises(ValueError, match="'perplexity' has no few-shot form"):
    eval_tasks.solved("perplexity", {"text": "t"})
  assert eval_tasks.fewshot_prefix(["s1", "s2"], "\n\n") == "s1\n\ns2\n\n"
  assert eval_tasks.fewshot_prefix([], "\n\n") == ""
  assert eval_tasks.draw_shots([{"text": "t"}], 0, 0, 0, 0, {"text": "t"}) == []


def test_generation_stops_at_the_earliest_stop_string():
  assert eval_tasks.cut_at_stop("Paris.\nQ: next", ["\n", "."]) == "Paris"
  assert eval_tasks.cut_at_stop("Paris", ["\n", ""]) == "Paris"


def test_flag_values_spell_newlines_and_tabs():
  assert eval_tasks.unescape(r"Q:\nA:\t|\\n") == "Q:\nA:\t|\\n"  # An escaped backslash stays one.


def test_default_splits():
  p = eval_tasks.parse_spec
  assert eval_tasks.eval_split(p("perplexity:tfds:lm1b")) == "test"  # Unmapped: test / train.
  assert eval_tasks.fewshot_split(p("perplexity:tfds:lm1b")) == "train"
  assert eval_tasks.eval_split(p("multiple_choice:tfds:glue/rte")) == "validation"
  assert eval_tasks.eval_split(p("multiple_choice:tfds:glue/rte:train")) == "train"  # Given wins.


def test_table_and_json_output(tmp_path):
  table = eval_tasks.format_table({"lambada": {"acc": 0.5, "acc_stderr": 0.01, "num_items": 10}})
  assert table.splitlines() == [
    "task     metric     value   stderr",
    "lambada  acc        0.5000  ± 0.0100",
    "lambada  num_items  10",
  ]
  assert eval_tasks.json_safe({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)]}) == {
    "a": None,
    "b": [1.5, 2],
  }


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("every_steps", -1, "config.eval.every_steps=-1 is invalid: must be a number >= 0"),
    ("num_batches", -1, "config.eval.num_batches=-1 is invalid: must be a number >= 0"),
    ("batch_size", -8, "config.eval.batch_size=-8 is invalid: must be a number >= 0"),
    (
      "tasks",
      ("perplexity:/x.jsonl", "ranking:/y.jsonl"),
      "config.eval.tasks='ranking:/y.jsonl' is invalid: "
      "--task='ranking:/y.jsonl': unknown task kind 'ranking'",
    ),
  ],
)
def test_validate_names_the_field(debug_config, field, value, message):
  debug_config.eval[field] = value
  with pytest.raises(errors.ConfigError) as e:
    eval_tasks.validate(debug_config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_task_files_are_not_opened_by_validation(debug_config):
  # A saved config stays loadable where its task files are not: pretraining checks them at start.
  debug_config.eval.tasks = ("perplexity:/no/such/file.jsonl",)
  eval_tasks.validate(debug_config)
