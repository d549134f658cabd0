"""Every command in the README's fenced `bash` blocks is run: the quick start's training job and
the "Next steps" that follow it for real (with overrides that make them tiny), in a fresh
directory as a user would paste them; every other command is checked to parse (absl's
`--only_check_args`: flags, config file and `--config.*` overrides, then exit before main; the
launchers' `--dry-run`; lm_eval's `--help`). A renamed flag, config field or config file that the
README still uses fails here."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Overrides that make a README command tiny, by program, when it is run for real.
TINY = {
  "gpt_jax.main": [
    "--config.train.num_steps=4",
    "--config.train.batch_size=8",
    "--config.data.max_documents=80",
    "--config.eval.every_steps=4",
    "--config.eval.num_batches=2",
    "--config.checkpoint.every_steps=4",
    "--config.log.every_steps=2",
    "--config.sample.max_new_tokens=8",
  ],
  "gpt_jax.sample": ["--max_new_tokens=8"],
  "gpt_jax.evaluate": ["--limit=4"],
  "gpt_jax.finetune": [
    "--config.finetune.max_examples=16",
    "--config.finetune.epochs=1",
    "--config.train.batch_size=8",
  ],
  "gpt_jax.chat": ["--num_candidates=2", "--max_new_tokens=8"],
}


def _sections() -> dict[str, str]:
  """README text by `## ` heading."""
  parts = re.split(r"^## (.+)$", README, flags=re.M)
  return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _commands(text: str) -> list[list[str]]:
  """The commands of the fenced bash blocks in `text`: continuation lines joined, comments dropped."""
  commands = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      words = shlex.split(line, comments=True)
      if words:
        commands.append(words)
  return commands


def _env():
  # PYTHONPATH stands in for `pip install -e .`: the commands run from another directory.
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _run(argv, cwd, timeout=600):
  return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _program(words: list[str]) -> str:
  return words[2] if words[:2] == ["python", "-m"] else words[0]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
  blocks = re.findall(r"^```bash\n(.*?)^```", _sections()["Quick start"], flags=re.S | re.M)
  assert len(blocks) == 2 and all(b.count("\n") == 1 for b in blocks), blocks
  train, tests = (b.strip() for b in blocks)
  assert train.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ")
  assert train.endswith("python -m gpt_jax.main --config=configs/shakespeare.py --workdir=runs/shakespeare")
  assert tests.endswith("&& python -m pytest")
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
  assert ci[-1] == tests  # CI runs exactly the README's test command.


def _guided() -> list[list[str]]:
  """The quick start's training job, then the Next steps commands, in order."""
  train = _commands(_sections()["Quick start"])[0]
  job = train[train.index("python") :] if "python" in train else None
  assert job is not None and job[:3] == ["python", "-m", "gpt_jax.main"], train
  return [job, *_commands(_sections()["Next steps on that run"])]


# Checks absl entry points in one process: the libraries are imported once, then each command
# runs in a forked child as `python -m MODULE ARGS --only_check_args` would (its module imported
# afresh as __main__, so its flags are defined as on the command line), its output to a file.
_DRIVER = """
import json, os, runpy, sys, tempfile
import jax, flax, optax, orbax.checkpoint, grain, tensorflow_datasets, tiktoken, tokenizers  # noqa
results = []
for argv in json.loads(sys.argv[1]):
  with tempfile.TemporaryFile(mode="w+") as out:
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(out.fileno(), 2)
      sys.argv = [argv[0], *argv[1:]]
      code = 1
      try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    results.append({"argv": argv, "status": os.waitstatus_to_exitcode(status), "output": out.read()[-3000:]})
print(json.dumps(results))
"""


def _check(words: list[str]) -> list[str] | None:
  """The parse check of a command that is not run for real: an argv for the driver (absl entry
  points, [module, args..., --only_check_args]) or None for a command checked on its own."""
  name = _program(words)
  if name.startswith("gpt_jax.") and name != "gpt_jax.harness":
    return [name, *words[3:], "--only_check_args"]
  return None


def _own_check(words: list[str]) -> list[str]:
  name = _program(words)
  if name in ("gpt-jax-lm-eval", "gpt_jax.harness"):  # lm_eval's argparse: its subcommand parses.
    sub = words[1] if name == "gpt-jax-lm-eval" else words[3]
    return [sys.executable, "-m", "gpt_jax.harness", sub, "--help"]
  if name == "sbatch":  # sbatch's own options, then the script and its options.
    words = words[next(i for i, w in enumerate(words) if w.startswith("launch/")) :]
  if words[0].startswith("launch/"):
    return ["bash", str(ROOT / words[0]), "--dry-run", *words[1:]]
  raise AssertionError(f"README command with no check: {shlex.join(words)}")


def test_every_other_readme_command_parses(tmp_path):
  guided = [shlex.join(c) for c in _guided()]
  others = [c for c in _commands(README) if shlex.join(c) not in guided and c[0] != "python3"]
  assert len(others) >= 20, len(others)  # The reference sections' commands were found.
  driven = [argv for argv in map(_check, others) if argv is not None]
  out = _run([sys.executable, "-c", _DRIVER, json.dumps(driven)], cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r["argv"] for r in results] == driven
  for r in results:
    assert r["status"] == 0, f"{shlex.join(r['argv'])}\n{r['output']}"
  for words in others:
    if _check(words) is None:
      out = _run(_own_check(words), cwd=tmp_path, timeout=300)
      assert out.returncode == 0, f"{shlex.join(words)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"


@pytest.mark.slow
def test_the_quick_start_job_and_next_steps_run_as_pasted(tmp_path):
  for words in _guided():
    name = _program(words)
    extra = TINY.get(name, []) if "--make_example" not in " ".join(words) else []
    if name == "gpt_jax.finetune" and not any(w.startswith("--config=") for w in words):
      extra = []
    out = _run([sys.executable, *words[1:], *extra], cwd=tmp_path)
    where = f"{shlex.join(words)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert out.returncode == 0 and "error:" not in out.stderr, where
    if name == "gpt_jax.main":
      assert "validation" in out.stdout + out.stderr, where
    if name == "gpt_jax.evaluate":
      assert "token_perplexity" in out.stdout, where
    if name == "gpt_jax.chat":
      assert len(out.stdout.strip().splitlines()) == 1, where  # One reply, one line.
  assert (tmp_path / "runs" / "shakespeare_hf" / "model.safetensors").is_file()
  assert (tmp_path / "runs" / "clf" / "best" / "best.json").is_file()
