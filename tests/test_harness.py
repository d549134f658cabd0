"""lm-evaluation-harness adapter: per-request parity with gpt_jax.evaluate, offline local tasks.

Tasks are dict configs over local JSONL files (`dataset_path: json`) read
through TaskManager(include_defaults=False); no hub access. The model is a
random GPT2LMHeadModel saved locally and imported with convert.from_hf.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api import registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gpt_jax import (  # noqa: E402
  convert,
  errors,  # noqa: E402
  evaluate,
  harness,
  tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
TOL = 1e-5
WORDS = (
  "the a cat dog sat on mat quick brown fox jumps over lazy river bank red green blue house tree ran".split()
)


def _corpus(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(3, 25))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_bpe(_corpus(300, 0), 360)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
  path = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(
    vocab_size=tok.vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1
  )
  transformers.GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
  tok.save(str(path))
  return path


@pytest.fixture(scope="module")
def ours(hf_dir):
  return convert.from_hf(hf_dir)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _task(name, path, **fields):
  return {
    "task": name,
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": path}},
    "test_split": "test",
    **fields,
  }


def _responses(samples, name):
  return [s["filtered_resps"] for s in sorted(samples[name], key=lambda s: s["doc_id"])]


def test_harness_requests_match_gpt_jax_evaluator(tmp_path, tok, ours):
  cfg, params = ours
  rng = np.random.default_rng(1)
  mc = [{"context": c, "choices": list(rng.choice(WORDS, 3)), "label": 1} for c in _corpus(5, 2)]
  texts = _corpus(4, 3) + [" ".join(_corpus(10, 4))]  # the last one needs several windows
  qa = [{"context": f"{c}\nQ:", "answers": ["cat"]} for c in _corpus(3, 5)]
  paths = {
    n: _write_jsonl(tmp_path / f"{n}.jsonl", r)
    for n, r in (("mc", mc), ("txt", [{"text": t} for t in texts]), ("qa", qa))
  }
  assert len(tok.encode(texts[-1])) > 3 * BLOCK
  tasks = [
    _task(
      "h_mc",
      paths["mc"],
      output_type="multiple_choice",
      doc_to_text="{{context}}",
      doc_to_choice="{{choices}}",
      doc_to_target="{{label}}",
      metric_list=[{"metric": "acc"}],
    ),
    _task(  # LAMBADA-style, as lm_eval's lambada tasks phrase it.
      "h_lw",
      paths["txt"],
      output_type="loglikelihood",
      doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
      doc_to_target="{{' ' + text.split(' ')[-1]}}",
      metric_list=[{"metric": "acc"}],
    ),
    _task(  # WikiText-style.
      "h_roll",
      paths["txt"],
      output_type="loglikelihood_rolling",
      doc_to_text="",
      doc_to_target="{{text}}",
      metric_list=[{"metric": "word_perplexity"}],
    ),
    _task(
      "h_gen",
      paths["qa"],
      output_type="generate_until",
      doc_to_text="{{context}}",
      doc_to_target="{{answers[0]}}",
      generation_kwargs={"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
      metric_list=[{"metric": "exact_match"}],
    ),
  ]
  lm = harness.GptJaxLM(model_cfg=cfg, params=params, tokenizer=tok, batch_size=3)
  out = lm_eval.simple_evaluate(
    model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False), log_samples=True
  )
  samples = out["samples"]

  # Multiple choice: lm_eval puts its target delimiter " " before each choice.
  mc_ours = _write_jsonl(
    tmp_path / "mc_ours.jsonl", [{**r, "choices": [" " + c for c in r["choices"]]} for r in mc]
  )
  want = evaluate.run_task(cfg, params, tok, f"multiple_choice:{mc_ours}", evaluate.Options(batch_size=4))
  for got, ref in zip(_responses(samples, "h_mc"), want.samples):
    np.testing.assert_allclose([ll for ll, _ in got], ref["loglikelihoods"], atol=TOL)
  assert out["results"]["h_mc"]["acc,none"] == pytest.approx(want.metrics["acc"])

  want = evaluate.run_task(cfg, params, tok, f"last_word:{paths['txt']}", evaluate.Options(batch_size=4))
  for got, ref in zip(_responses(samples, "h_lw"), want.samples):
    assert got[0][0] == pytest.approx(ref["logprob"], abs=TOL) and got[0][1] == ref["is_greedy"]

  # Rolling log-likelihood = gpt_jax perplexity with lm_eval's disjoint windows (stride = block_size).
  opts = evaluate.Options(batch_size=4, stride=BLOCK)
  want = evaluate.run_task(cfg, params, tok, f"perplexity:{paths['txt']}", opts)
  np.testing.assert_allclose(
    [g[0] for g in _responses(samples, "h_roll")], [-s["nll"] for s in want.samples], atol=TOL
  )

  opts = evaluate.Options(batch_size=3, max_gen_tokens=5, until=("\n",))
  want = evaluate.run_task(cfg, params, tok, f"generate:{paths['qa']}", opts)
  assert [g[0] for g in _responses(samples, "h_gen")] == [s["generation"] for s in want.samples]


def test_model_args_and_registry(ours, tok):
  cfg, params = ours
  assert registry.get_model("gpt_jax") is harness.GptJaxLM
  assert registry.get_model("dummy").__name__ == "DummyLM"  # built-in models survive our registration
  lm = harness.GptJaxLM(model_cfg=cfg, params=params, tokenizer=tok, batch_size="auto:4", device="cpu")
  assert lm.batch_size == harness.DEFAULT_BATCH_SIZE and lm.max_length == BLOCK
  assert lm.rolling_stride == BLOCK
  assert harness.GptJaxLM(model_cfg=cfg, params=params, tokenizer=tok, batch_size="5").batch_size == 5
  with pytest.raises(errors.UserError, match="batch_size='x'"):
    harness.GptJaxLM(model_cfg=cfg, params=params, tokenizer=tok, batch_size="x")
  with pytest.raises(errors.UserError, match="rolling_stride=99"):
    harness.GptJaxLM(model_cfg=cfg, params=params, tokenizer=tok, rolling_stride=99)
  # Empty context: scored from EOT, as lm_eval expects.
  ((ll, _),) = lm.loglikelihood([_Instance(("", " cat"))], disable_tqdm=True)
  ((ref, _),) = [
    (s.logprob, s.is_greedy)
    for s in evaluate.score_requests(cfg, params, [([tok.eot_id], tok.encode(" cat"))], batch_size=1)
  ]
  assert ll == pytest.approx(ref, abs=TOL)


class _Instance:
  def __init__(self, args):
    self.args = args


def test_harness_imports_no_torch():
  code = (
    "import sys, gpt_jax.harness; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_wrapper_cli_runs_a_local_yaml_task(tmp_path, hf_dir, tok, ours):
  cfg, params = ours
  data = _write_jsonl(
    tmp_path / "mc.jsonl", [{"context": c, "choices": ["cat", "dog"], "label": 0} for c in _corpus(4, 7)]
  )
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
    "task: tiny_mc\ndataset_path: json\n"
    f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
    "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
  )
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
  cmd = [
    sys.executable,
    "-m",
    "gpt_jax.harness",
    "run",
    "--model",
    "gpt_jax",
    "--model_args",
    f"hf_dir={hf_dir}",
  ]
  cmd += ["--batch_size", "4", "--tasks", "tiny_mc", "--include_path", str(tmp_path / "tasks")]
  cmd += ["--output_path", str(tmp_path / "out")]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  (result_file,) = (tmp_path / "out").rglob("results_*.json")
  acc = json.loads(result_file.read_text())["results"]["tiny_mc"]["acc,none"]
  mc = _write_jsonl(
    tmp_path / "ours.jsonl", [{"context": c, "choices": [" cat", " dog"], "label": 0} for c in _corpus(4, 7)]
  )
  assert acc == pytest.approx(evaluate.run_task(cfg, params, tok, f"multiple_choice:{mc}").metrics["acc"])


def test_wrapper_turns_user_errors_into_one_line_exit_2(monkeypatch, capsys):
  import lm_eval.__main__

  def fail():
    harness.GptJaxLM(hf_dir="/nope")

  monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fail)
  with pytest.raises(SystemExit) as exit_info:
    harness.main()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "/nope" in err and len(err.splitlines()) == 1
