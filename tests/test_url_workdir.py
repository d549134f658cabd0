"""Run directories given as URLs (gs://BUCKET/PATH).

No bucket is reachable here: tests/fake_gcs.py (conftest.py's `bucket`
fixture) maps gs://... onto a local folder, for etils.epath (fsspec) and for
Orbax. Everything else (config, tokenizer, metrics, TensorBoard, the
host-local token and compilation caches) takes the code path a real bucket
takes. The URL rules themselves are tested in test_paths.py.
"""

import json
import os
import shutil
import threading
import time

import fake_gcs
import jax
import orbax.checkpoint as ocp
import pytest
from etils import epath

from gpt_jax import convert, data, finetune, loading, metrics, paths, pretrain, train
from gpt_jax.errors import UserError


def _steps(path):
  return [json.loads(line)["step"] for line in open(path)]


def _train_steps(path):
  """Steps of the training records (the final evaluation adds a record at the last step)."""
  return [r["step"] for r in map(json.loads, open(path)) if "loss" in r]


def test_pretraining_in_a_bucket_writes_there_and_resumes_on_a_fresh_host(
  debug_config, bucket, tmp_path, monkeypatch
):
  debug_config.train.num_steps = 4
  debug_config.checkpoint.every_steps = 2
  debug_config.eval.every_steps = 0
  # JAX sets its cache up once per process: a bucket one would outlive the fake.
  debug_config.train.compilation_cache_dir = str(tmp_path / "jax_cache")
  first = pretrain.run(debug_config, "gs://bkt/runs/a/")
  run = bucket / "bkt" / "runs" / "a"
  assert json.loads((run / "config.json").read_text())["train"]["num_steps"] == 4
  assert (run / "tokenizer" / "gpt_jax_tokenizer.json").is_file()
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
  assert _train_steps(run / "metrics.jsonl") == [1, 2, 3, 4]
  assert any(f.name.startswith("events.out.tfevents") for f in (run / "tensorboard").iterdir())
  # The memory-mapped token cache stays on this host.
  local = tmp_path / "cache" / "gpt_jax" / "gs" / "bkt" / "runs" / "a"
  assert list((local / "data" / "tokens").glob("*/header.json"))
  assert not (run / "data").exists()
  assert first["step"] == 4

  # A preempted job comes back on another VM: nothing local survives.
  shutil.rmtree(tmp_path / "cache")
  debug_config.train.num_steps = 6
  assert pretrain.run(debug_config, "gs://bkt/runs/a")["step"] == 6
  assert _train_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
  assert {"4", "6"} <= {p.name for p in (run / "checkpoints").iterdir()}
  assert (run / "config.json.previous").is_file()

  # Sampling / evaluation load the model and the tokenizer from the bucket,
  # passing over a save in progress: in a bucket it is named <step>/ already,
  # and only Orbax's commit marker says it is unfinished.
  (run / "checkpoints" / "8" / "state").mkdir(parents=True)
  real = ocp.step.is_path_finalized

  def unfinished_8(p, **kw):
    return epath.Path(p).name != "8" and real(p, **kw)

  monkeypatch.setattr(ocp.step, "is_path_finalized", unfinished_8)
  model_cfg, params, tok = loading.load_for_inference("gs://bkt/runs/a")
  assert model_cfg.d_model == debug_config.model.d_model and tok.vocab_size <= model_cfg.vocab_size
  # Fine-tuning (in a local folder) starts from it.
  assert finetune.pretrained_model_config("gs://bkt/runs/a").d_model == debug_config.model.d_model
  assert finetune.pretrained_tokenizer("gs://bkt/runs/a").fingerprint == tok.fingerprint
  # Export to a Hugging Face folder, tokenizer files included.
  convert._export("gs://bkt/runs/a", str(tmp_path / "hf"), None)
  assert json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8")) == json.loads(
    (run / "tokenizer" / "vocab.json").read_text(encoding="utf-8")
  )
  assert convert.from_hf(str(tmp_path / "hf"))[0].d_model == debug_config.model.d_model


def test_a_bucket_workdir_keeps_its_compilation_cache_there(debug_config):
  before = jax.config.jax_compilation_cache_dir
  try:
    train.enable_compilation_cache(debug_config, "gs://bkt/run")
    assert jax.config.jax_compilation_cache_dir == "gs://bkt/run/jax_cache"  # Shared by every host.
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_every_start_keeps_the_previous_config(debug_config, bucket, tmp_path, where):
  workdir = "gs://bkt/w" if where == "bucket" else str(tmp_path / "w")
  folder = bucket / "bkt" / "w" if where == "bucket" else tmp_path / "w"
  for steps in (3, 4, 5):
    debug_config.train.num_steps = steps
    train.prepare_workdir(debug_config, workdir)
  assert json.loads((folder / "config.json").read_text())["train"]["num_steps"] == 5
  assert json.loads((folder / "config.json.previous").read_text())["train"]["num_steps"] == 4
  assert sorted(p.name for p in folder.iterdir()) == ["config.json", "config.json.previous"]


def test_metrics_mirror_pulls_history_and_pushes_only_changes(bucket):
  run = epath.Path("gs://bkt/m")
  run.mkdir(parents=True)
  (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
  w = metrics.MetricsWriter("gs://bkt/m", tensorboard=False, start_step=2, upload_every_s=3600)
  assert w.files_dir == paths.local_dir("gs://bkt/m")
  # Step 3 is about to be redone: moved aside locally, not yet in the bucket.
  w.write(3, {"loss": 1.5})
  assert _steps(bucket / "bkt" / "m" / "metrics.jsonl") == [1, 2, 3]
  w.close()
  assert _steps(bucket / "bkt" / "m" / "metrics.jsonl") == [1, 2, 3]
  assert json.loads((bucket / "bkt" / "m" / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 1.5
  assert _steps(bucket / "bkt" / "m" / "metrics.superseded.jsonl") == [3]
  mirror = metrics.RunFileMirror("gs://bkt/m")
  mirror.pull("metrics.jsonl", "metrics.superseded.jsonl")
  assert mirror.push() == 0  # Nothing changed since the pull.
  with open(os.path.join(mirror.local, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 4}) + "\n")
  os.makedirs(os.path.join(mirror.local, "data"), exist_ok=True)
  open(os.path.join(mirror.local, "data", "big.npy"), "wb").close()  # Not a run file: never uploaded.
  assert mirror.push() == 1
  assert _steps(bucket / "bkt" / "m" / "metrics.jsonl") == [1, 2, 3, 4]
  assert not (bucket / "bkt" / "m" / "data").exists()


def test_a_filesystem_without_locks_still_builds_the_token_cache(debug_config, bucket, monkeypatch, tmp_path):
  import errno
  import fcntl

  def no_locks(f, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  debug_config.data.max_documents = 20
  tok = data.tokenizer_lib.train_bpe(["to be or not to be"] * 4, 300)
  cache = data.prepare_cache(debug_config.data, tok, "gs://bkt/nolock")
  assert cache.num_tokens("train") > 0 and (cache.directory / "header.json").is_file()


def test_a_failed_upload_is_logged_and_training_goes_on(bucket, monkeypatch, caplog):
  def fail(self):
    raise OSError("503 Service Unavailable")

  monkeypatch.setattr(metrics.RunFileMirror, "push", fail)
  w = metrics.MetricsWriter("gs://bkt/u", tensorboard=False, upload_every_s=0)
  w.write(1, {"loss": 2.0})
  w.close()
  assert "could not copy run files to gs://bkt/u (OSError: 503 Service Unavailable)" in caplog.text


def test_data_dir_url_is_refused(debug_config):
  debug_config.data.data_dir = "gs://bkt/data"
  with pytest.raises(UserError, match="data.data_dir=gs://bkt/data: must be a local folder"):
    data.cache_dir(debug_config.data, "/tmp/run")


def test_finetuning_refuses_a_url_workdir(bucket):
  from configs import finetune_sst2

  with pytest.raises(UserError, match="--workdir=gs://bkt/ft: fine-tuning needs a local or mounted folder"):
    finetune.run(finetune_sst2.get_config(), "gs://bkt/ft")
  assert not (bucket / "bkt").exists()


@pytest.mark.parametrize("data_dir", ["", "local"])
def test_host_local_token_cache_is_built_once_per_host(debug_config, bucket, monkeypatch, tmp_path, data_dir):
  """With a URL workdir each host builds the token cache (in local_dir or data.data_dir): of the
  processes of one host, one builds and the rest wait, whatever their process index."""
  debug_config.data.data_dir = str(tmp_path / "data") if data_dir else ""
  builds = []

  def slow_build(data_cfg, tokenizer, directory, *args, **kwargs):
    builds.append(threading.get_ident())
    time.sleep(0.5)
    directory.mkdir(parents=True)
    (directory / "header.json").write_text("{}")

  monkeypatch.setattr(data, "_build_cache", slow_build)
  monkeypatch.setattr(data, "_check_header", lambda *a: None)
  monkeypatch.setattr(data, "TokenCache", lambda d, h, s: d)
  monkeypatch.setattr(data.token_store.TokenStream, "from_store", lambda d, s: None)
  got = []

  def worker(i):
    got.append(data.prepare_cache(debug_config.data, None, "gs://bkt/r", process_index=i, process_count=3))

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(builds) == 1 and len(got) == 3 and len(set(map(str, got))) == 1


def _two_processes_in_a_bucket(tmp_path, *extra):
  """Runs configs/debug.py as two processes on gs://bkt/run; returns (exit codes, logs, bucket root)."""
  from test_distributed import cpu_env, free_port, main_command, run_processes

  root = tmp_path / "gcs"
  root.mkdir()
  env = fake_gcs.subprocess_env(cpu_env(2), root, tmp_path / "site")
  env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
  port = free_port()
  cmds = [
    main_command(
      "gs://bkt/run", tmp_path / "jax_cache", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--process_id={i}", *extra[i],
    )
    for i in range(2)
  ]  # fmt: skip
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  return run_processes(cmds, env, logs, timeout=300), logs, root


@pytest.mark.slow
def test_two_processes_train_in_a_bucket(tmp_path):
  """Process 1 waits for the tokenizer in the bucket; the two share this host's token cache."""
  from test_distributed import tail

  codes, logs, root = _two_processes_in_a_bucket(tmp_path, [], [])
  assert codes == [0, 0], "\n\n".join(tail(log) for log in logs)
  run = root / "bkt" / "run"
  assert _train_steps(run / "metrics.jsonl") == [1, 2, 3]
  assert {"2", "3"} <= {p.name for p in (run / "checkpoints").iterdir()}
  assert (run / "tokenizer" / "gpt_jax_tokenizer.json").is_file() and not (run / "data").exists()
  local = tmp_path / "cache" / "gpt_jax" / "gs" / "bkt" / "run" / "data" / "tokens"
  assert len(list(local.glob("*/header.json"))) == 1
  assert not [p for p in local.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_processes_that_tokenised_different_data_stop_with_one_line(tmp_path):
  """Each host of a bucket run tokenises its own copy: unequal copies are found before training."""
  codes, logs, root = _two_processes_in_a_bucket(
    tmp_path, ["--config.data.max_documents=40"], ["--config.data.max_documents=30"]
  )
  assert codes == [2, 2]
  for log in logs:
    text = log.read_text()  # (Gloo's own lines, unflushed, may run into it.)
    assert text.count("error: ") == 1 and "error: processes [1] tokenised other data than process 0" in text
  assert not (root / "bkt" / "run" / "checkpoints").exists() or not any(
    (root / "bkt" / "run" / "checkpoints").iterdir()
  )
