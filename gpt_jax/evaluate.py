"""Zero/few-shot evaluation in the GPT-2 / GPT-3 protocols, and its CLI.

    python -m gpt_jax.evaluate --hf_dir=/models/gpt2 --task=last_word:/data/lambada.jsonl \\
        --task=multiple_choice:tfds:hellaswag --num_fewshot=5 --output=results.json

Task kinds (schemas in gpt_jax/eval_tasks.py): `perplexity` (token / word
perplexity and bits per byte of documents, GPT-2 §3.1), `last_word`
(LAMBADA: greedy accuracy and perplexity of the final word, GPT-2 §3.3),
`multiple_choice` (log-likelihood ranking, GPT-3 §2.4) and `generate`
(greedy answers scored by SQuAD exact match / F1, GPT-3 §3.2).

Every task runs through one scorer, `score_requests`: (context ids,
continuation ids) pairs -> summed log-probability of the continuation, its
token count, and whether greedy decoding would produce it. Each request is
right-padded to its length bucket (a power of two from MIN_BUCKET up to
block_size: few compilations); a bucket's requests are packed longest first
into batches of max(batch_size, MIN_TOKENS // bucket) rows, and scores come
back in the original order. Right padding leaves every real position's
logits unchanged (causal attention, positions from 0), padded positions are
masked out, and per-token log-probabilities are summed on the host in
float64, so scores do not depend on the batch size or on what else is
evaluated (bit for bit on CPU; see MIN_TOKENS).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from gpt_jax import cli, eval_tasks, loading, model_config, sample, sharding, speculative
from gpt_jax import model as model_lib
from gpt_jax.errors import UserError

MIN_BUCKET = 16  # Shortest padded length; shorter requests share its program.
# Fewest tokens (rows x padded length) per forward pass: short buckets get
# more rows than --batch_size. Tiny calls waste dispatch time, and XLA:CPU
# multiplies matrices of fewer than ~128 rows with other kernels whose float32
# rounding differs, which would tie scores to the batch size by ~1 ulp/token.
MIN_TOKENS = 256
# Mesh axes the batch is split over when params are sharded (gpt_jax.sharding's names).
_BATCH_AXES = ("data", "fsdp")

# ----------------------------------------------------------------- scorer


class Score(NamedTuple):
  logprob: float  # sum of log P(continuation token | everything before it), nats
  num_tokens: int
  is_greedy: bool  # every continuation token is the argmax of its distribution
  greedy_ids: tuple[int, ...] = ()  # the argmax at each continuation position (teacher-forced)


def length_bucket(length: int, block_size: int) -> int:
  """Padded length: the next power of two >= length (at least MIN_BUCKET), at most block_size."""
  return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), block_size)


@functools.lru_cache(maxsize=16)
def _program(cfg, mesh):
  """Jitted (params, inputs_BT, targets_BT) -> (log P(target) [B, T], argmax id [B, T])."""
  model = model_lib.GPT(cfg)

  def fn(params, inputs_BT, targets_BT):
    logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=True)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[:, :, None], axis=-1)[:, :, 0]
    logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return logp_BT, jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)

  if mesh is None:
    return jax.jit(fn)
  # Replicated outputs: every host can read every score (multi-host meshes).
  return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _batch_layout(mesh, batch_size: int, length: int):
  """(rows per batch, input sharding) for a bucket: rows split over the mesh's data-parallel axes."""
  rows = max(batch_size, -(-MIN_TOKENS // length))
  if mesh is None:
    return rows, None
  axes = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  return -(-rows // ways) * ways, NamedSharding(mesh, PartitionSpec(axes or None))


def _put(array, sharding):
  if sharding is None:
    return array
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def score_requests(
  model_cfg,
  params,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  *,
  batch_size: int,
  progress: bool = False,
  desc: str = "scoring",
) -> list[Score]:
  """Scores of continuations given contexts, in the order of `requests`.

  Each request is (context ids, continuation ids); the context must be
  non-empty (start it with EOT when there is none). A context longer than
  the model allows is truncated from the LEFT: the model sees the last
  block_size + 1 - len(continuation) context tokens. A continuation longer
  than block_size is a UserError. Params may be sharded (NamedSharding):
  the batch is then split over the mesh's data/fsdp axes.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise UserError(f"batch_size={batch_size!r} must be a positive integer")
  block = model_cfg.block_size
  rows = []  # (tokens seen + predicted, number of continuation tokens) per request
  truncated = 0
  for n, (context, continuation) in enumerate(requests):
    context, continuation = [int(t) for t in context], [int(t) for t in continuation]
    if not context:
      raise ValueError(f"request {n} has an empty context (start it with the EOT token)")
    if len(continuation) > block:
      raise UserError(
        f"{desc + ': ' if desc else ''}request {n}: a continuation of {len(continuation)} tokens "
        f"cannot be scored: model.block_size={block}"
      )
    truncated += len(context) + len(continuation) > block + 1
    rows.append(((context + continuation)[-(block + 1) :], len(continuation)))
  if truncated:
    logging.warning(
      "%s%d of %d contexts were cut from the left to fit model.block_size=%d",
      f"{desc}: " if desc else "",
      truncated,
      len(requests),
      block,
    )

  scores: list[Score | None] = [Score(0.0, 0, True) if not c else None for _, c in rows]
  todo = sorted((i for i, s in enumerate(scores) if s is None), key=lambda i: (-len(rows[i][0]), i))
  mesh = sharding.params_mesh(params)
  fn = _program(model_config.of(model_cfg), mesh)

  def collect(batch, out):
    logp_BT, argmax_BT = (np.asarray(x) for x in out)
    for b, i in enumerate(batch):
      tokens, num_cont = rows[i]
      end = len(tokens) - 1
      span = slice(end - num_cont, end)
      logprob = float(np.sum(logp_BT[b, span], dtype=np.float64))
      greedy = argmax_BT[b, span]
      is_greedy = bool(np.array_equal(greedy, tokens[end - num_cont + 1 : end + 1]))
      scores[i] = Score(logprob, num_cont, is_greedy, tuple(int(t) for t in greedy))

  # Each request runs at its own bucket's length, whatever else is scored.
  by_bucket: dict[int, list[int]] = {}
  for i in todo:
    by_bucket.setdefault(length_bucket(len(rows[i][0]) - 1, block), []).append(i)
  batches = []
  for T, members in by_bucket.items():
    num_rows, rows_sharding = _batch_layout(mesh, batch_size, T)
    batches += [
      (T, num_rows, rows_sharding, members[s : s + num_rows]) for s in range(0, len(members), num_rows)
    ]
  pending = None
  for T, num_rows, rows_sharding, batch in tqdm(
    batches, desc=desc, unit="batch", disable=not progress, leave=False
  ):
    inputs_BT = np.zeros((num_rows, T), np.int32)
    targets_BT = np.zeros((num_rows, T), np.int32)
    for b, i in enumerate(batch):
      tokens = rows[i][0]
      inputs_BT[b, : len(tokens) - 1] = tokens[:-1]
      targets_BT[b, : len(tokens) - 1] = tokens[1:]
    out = fn(params, _put(inputs_BT, rows_sharding), _put(targets_BT, rows_sharding))
    if pending is not None:  # Read the previous batch while this one runs.
      collect(*pending)
    pending = (batch, out)
  if pending is not None:
    collect(*pending)
  return scores


# ----------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything that shapes an evaluation besides the model (CLI flags of the same names)."""

  batch_size: int = 8
  num_fewshot: int = 0
  seed: int = 0
  limit: int = 0  # Evaluate only the first N items of each task (0 = all).
  stride: int = 0  # Perplexity sliding-window stride; 0 = block_size // 2.
  unconditional_norm: bool = False
  uncond_prompt: str = "Answer:"
  fewshot_file: str = ""
  fewshot_separator: str = "\n\n"
  until: tuple[str, ...] = ("\n",)
  max_gen_tokens: int = 32
  tfds_data_dir: str = ""
  progress: bool = False


@dataclasses.dataclass
class TaskResult:
  name: str
  metrics: dict[str, float]
  samples: list[dict]  # One record per item (scores, prediction), for inspection.


@dataclasses.dataclass
class _Job:
  cfg: object
  params: object
  tok: object
  opts: Options
  name: str
  draft: Any = None  # speculative.Draft: generate tasks decode speculatively.

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text) if text else []

  def prompt(self, shots: list[str], context: str) -> str:
    return eval_tasks.fewshot_prefix(shots, self.opts.fewshot_separator) + context

  def prompt_ids(self, shots: list[str], context: str) -> list[int]:
    """The prompt tokenised as one text; EOT when it is empty."""
    return self.encode(self.prompt(shots, context)) or [self.tok.eot_id]

  def score(self, requests) -> list[Score]:
    return score_requests(
      self.cfg,
      self.params,
      requests,
      batch_size=self.opts.batch_size,
      progress=self.opts.progress,
      desc=self.name,
    )


def _fit(shots: list[str], fits) -> tuple[list[str], bool]:
  """Drops whole shots, first ones first, until `fits(shots)`; (shots kept, any dropped)."""
  dropped = False
  while shots and not fits(shots):
    shots, dropped = shots[1:], True
  return shots, dropped


def _run_perplexity(job: _Job, items, shots_for) -> tuple[dict, list[dict]]:
  block = job.cfg.block_size
  stride = job.opts.stride or max(1, block // 2)
  if not 1 <= stride <= block:
    raise UserError(f"--stride={stride} must be in [1, model.block_size={block}]")
  texts = [it["text"] for it in items]
  encode_batch = getattr(job.tok, "encode_batch", None)
  docs = encode_batch(texts) if encode_batch else [job.tok.encode(t) for t in texts]
  requests, owner = [], []
  for d, ids in enumerate(docs):
    # EOT first: every token of the document is predicted, the first one
    # from the document boundary, as GPT-2 saw documents in training.
    for req in eval_tasks.rolling_windows([job.tok.eot_id, *ids], block, stride):
      requests.append(req)
      owner.append(d)
  nll, num_tokens = np.zeros(len(docs)), np.zeros(len(docs))
  for d, s in zip(owner, job.score(requests)):
    nll[d] -= s.logprob
    num_tokens[d] += s.num_tokens
  words = np.array([len(t.split()) for t in texts], np.float64)
  num_bytes = np.array([len(t.encode("utf-8")) for t in texts], np.float64)
  m = {}
  # Perplexities are exp of a ratio of sums over documents; the delta method
  # carries the ratio's standard error through exp (d exp(R) = exp(R) dR).
  for name, den in (("token_perplexity", num_tokens), ("word_perplexity", words)):
    r, se = eval_tasks.ratio_stderr(nll, den)
    eval_tasks.with_stderr(m, name, (math.exp(r), math.exp(r) * se))
  r, se = eval_tasks.ratio_stderr(nll, num_bytes)
  eval_tasks.with_stderr(m, "bits_per_byte", (r / math.log(2), se / math.log(2)))
  m.update(
    nll=float(nll.sum()),
    num_tokens=int(num_tokens.sum()),
    num_words=int(words.sum()),
    num_bytes=int(num_bytes.sum()),
    num_documents=len(docs),
  )
  samples = [
    {"text": t, "nll": float(a), "num_tokens": int(b), "perplexity": math.exp(min(a / max(b, 1), 50.0))}
    for t, a, b in zip(texts, nll, num_tokens)
  ]
  return m, samples


def _run_last_word(job: _Job, items, shots_for) -> tuple[dict, list[dict]]:
  requests, prompts, dropped = [], [], 0
  for i, item in enumerate(items):
    context, word = eval_tasks.last_word_split(item["text"])
    cont = job.encode(word)
    room = job.cfg.block_size + 1 - len(cont)
    shots, was_dropped = _fit(shots_for(i, item), lambda s, c=context, r=room: len(job.prompt_ids(s, c)) <= r)
    dropped += was_dropped
    prompts.append(job.prompt(shots, context))
    requests.append((job.prompt_ids(shots, context), cont))
  _warn_dropped(job.name, dropped)
  scores = job.score(requests)
  acc = [float(s.is_greedy) for s in scores]
  nll = np.array([-s.logprob for s in scores])
  m = {}
  eval_tasks.with_stderr(m, "acc", eval_tasks.mean_stderr(acc))
  mean, se = eval_tasks.mean_stderr(nll)
  eval_tasks.with_stderr(m, "perplexity", (math.exp(mean), math.exp(mean) * se))
  m["num_items"] = len(items)
  samples = [
    {
      "text": it["text"],
      "prompt": p,
      "word": eval_tasks.last_word_split(it["text"])[1],
      "prediction": job.tok.decode(list(s.greedy_ids)),  # Greedy, token by token, given the word's prefix.
      "correct": s.is_greedy,
      "logprob": s.logprob,
      "is_greedy": s.is_greedy,
    }
    for p, it, s in zip(prompts, items, scores)
  ]
  return m, samples


def _run_multiple_choice(job: _Job, items, shots_for) -> tuple[dict, list[dict]]:
  block = job.cfg.block_size
  requests, conts, dropped = [], [], 0
  for i, item in enumerate(items):
    pairs = list(zip(item["contexts"], item["continuations"]))

    def encoded(shots, pairs=pairs):
      return [eval_tasks.encode_pair(job.tok, job.prompt(shots, c), x) for c, x in pairs]

    def fits(shots, encoded=encoded):
      return all(len(c) + len(x) - 1 <= block for c, x in encoded(shots))

    shots, was_dropped = _fit(shots_for(i, item), fits)
    dropped += was_dropped
    requests.extend(encoded(shots))
    conts.append([eval_tasks.split_pair(c, x)[1] for c, x in pairs])
  _warn_dropped(job.name, dropped)
  uncond = []
  if job.opts.unconditional_norm:
    # GPT-3 §2.4: P(completion | context) / P(completion | "Answer:"), the
    # same completion string in both (the context's trailing whitespace moved in).
    prompt = job.opts.uncond_prompt.rstrip()
    uncond = [eval_tasks.encode_pair(job.tok, prompt, x) for cont in conts for x in cont]
  scores = job.score(requests + uncond)
  cond_scores, uncond_scores = scores[: len(requests)], scores[len(requests) :]
  correct = {"acc": [], "acc_norm": [], "acc_per_token": []}
  if uncond:
    correct["acc_uncond"] = []
  samples, k = [], 0
  for item, cont in zip(items, conts):
    c = len(cont)
    ll = np.array([s.logprob for s in cond_scores[k : k + c]])
    ntok = np.array([s.num_tokens for s in cond_scores[k : k + c]], np.float64)
    nbytes = np.array([len(x.encode("utf-8")) for x in cont], np.float64)
    # acc_norm divides by the continuation's UTF-8 bytes (tokenizer-independent
    # length); acc_per_token by its token count (GPT-3 §2.4).
    preds = {"acc": ll, "acc_norm": ll / nbytes, "acc_per_token": ll / ntok}
    contexts = item["contexts"]
    sample = {
      **({"context": contexts[0]} if len(set(contexts)) == 1 else {"contexts": contexts}),
      "choices": list(item["continuations"]),
      "label": item["label"],
      "prediction": int(np.argmax(ll)),
      "correct": bool(int(np.argmax(ll)) == item["label"]),
      "loglikelihoods": ll.tolist(),
      "num_tokens": ntok.astype(int).tolist(),
    }
    if uncond:
      ll_uncond = np.array([s.logprob for s in uncond_scores[k : k + c]])
      preds["acc_uncond"] = ll - ll_uncond
      sample["uncond_loglikelihoods"] = ll_uncond.tolist()
    for name, v in preds.items():
      correct[name].append(float(int(np.argmax(v)) == item["label"]))
    samples.append(sample)
    k += c
  m = {}
  for name, v in correct.items():
    eval_tasks.with_stderr(m, name, eval_tasks.mean_stderr(v))
  m["num_items"] = len(items)
  return m, samples


def _run_generate(job: _Job, items, shots_for) -> tuple[dict, list[dict]]:
  block, max_new = job.cfg.block_size, job.opts.max_gen_tokens
  if not 1 <= max_new < block:
    raise UserError(f"--max_gen_tokens={max_new} must be in [1, model.block_size={block})")
  prompts, prompt_ids, dropped = [], [], 0
  for i, item in enumerate(items):
    context = item["context"]
    shots, was_dropped = _fit(
      shots_for(i, item), lambda s, c=context: len(job.prompt_ids(s, c)) + max_new <= block
    )
    dropped += was_dropped
    prompts.append(job.prompt(shots, context))
    # Left truncation, as in scoring: the newest context matters most.
    prompt_ids.append(job.prompt_ids(shots, context)[-(block - max_new) :])
  _warn_dropped(job.name, dropped)
  texts = generate_texts(
    job.cfg,
    job.params,
    job.tok,
    prompt_ids,
    until=job.opts.until,
    max_new_tokens=max_new,
    batch_size=job.opts.batch_size,
    progress=job.opts.progress,
    desc=job.name,
    draft=job.draft,
  )
  em = [eval_tasks.exact_match(t, it["answers"]) for t, it in zip(texts, items)]
  f1 = [eval_tasks.f1(t, it["answers"]) for t, it in zip(texts, items)]
  m = {}
  eval_tasks.with_stderr(m, "exact_match", eval_tasks.mean_stderr(em))
  eval_tasks.with_stderr(m, "f1", eval_tasks.mean_stderr(f1))
  m["num_items"] = len(items)
  samples = [
    {
      "context": it["context"],
      "answers": list(it["answers"]),
      "prompt": p,
      "generation": t,
      "correct": e == 1.0,
      "exact_match": e,
      "f1": f,
    }
    for it, p, t, e, f in zip(items, prompts, texts, em, f1)
  ]
  return m, samples


def generate_texts(
  model_cfg,
  params,
  tokenizer,
  prompts: list[list[int]],
  *,
  until: Sequence[str],
  max_new_tokens: int,
  batch_size: int,
  progress: bool = False,
  desc: str = "generating",
  **sampling,
) -> list[str]:
  """Continuations of token prompts as text, cut before the first stop string.

  Greedy unless `sampling` (temperature, top_k, top_p, seed, draft: see
  gpt_jax.sample.generate) says otherwise. Prompts go to the KV-cache sampler
  in length-sorted groups of batch_size, so each group pads to a similar
  length; results come back in the input order.
  """
  sampling.setdefault("temperature", 0.0)
  # Never emit ids the tokenizer cannot decode (a model vocabulary padded past it).
  sampling.setdefault("vocab_limit", min(tokenizer.vocab_size, model_cfg.vocab_size))
  stops = [tokenizer.encode(s) for s in until if s]
  order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
  texts = [""] * len(prompts)
  groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
  for group in tqdm(groups, desc=desc, unit="batch", disable=not progress, leave=False):
    outs = sample.generate(
      model_cfg,
      params,
      [prompts[i] for i in group],
      max_new_tokens=max_new_tokens,
      eot_id=tokenizer.eot_id,
      stop_sequences=stops,
      **sampling,
    )
    for i, ids in zip(group, outs):
      texts[i] = eval_tasks.cut_at_stop(tokenizer.decode(ids), until)
  return texts


def _warn_dropped(name: str, count: int) -> None:
  if count:
    logging.warning("%s: %d items kept fewer few-shot examples to fit model.block_size", name, count)


RUNNERS = {
  "perplexity": _run_perplexity,
  "last_word": _run_last_word,
  "multiple_choice": _run_multiple_choice,
  "generate": _run_generate,
}


def _load(spec: eval_tasks.TaskSpec, opts: Options):
  """(items to evaluate, few-shot pool, whether the pool is the item list itself)."""
  if spec.path:
    items = eval_tasks.load_jsonl(spec.path, spec.kind)
  else:
    items = eval_tasks.load_tfds(spec, eval_tasks.eval_split(spec), opts.tfds_data_dir)
  if opts.num_fewshot <= 0 or spec.kind == "perplexity":
    return items, [], False
  if opts.fewshot_file:
    return items, eval_tasks.load_jsonl(opts.fewshot_file, spec.kind), False
  if spec.tfds_name and eval_tasks.fewshot_split(spec) != eval_tasks.eval_split(spec):
    return items, eval_tasks.load_tfds(spec, eval_tasks.fewshot_split(spec), opts.tfds_data_dir), False
  return items, items, True


def check_options(opts: Options) -> None:
  """The model-independent checks, so that a bad option fails before any loading."""
  for name in ("num_fewshot", "stride", "limit"):
    if getattr(opts, name) < 0:
      raise UserError(f"--{name}={getattr(opts, name)} must be >= 0")
  if opts.max_gen_tokens < 1:
    raise UserError(f"--max_gen_tokens={opts.max_gen_tokens} must be >= 1")
  if opts.batch_size <= 0:
    raise UserError(f"--batch_size={opts.batch_size} must be > 0")


def run_task(
  model_cfg, params, tokenizer, spec, options: Options | None = None, loaded=None, draft=None
) -> TaskResult:
  """One task (a spec string or TaskSpec): metrics with standard errors, and per-item samples.

  `loaded`: the task's (items, few-shot pool, pool is the items) from `_load`, if read already.
  `draft`: a speculative.Draft for generate tasks (the same tokens when greedy, fewer target passes).
  """
  opts = options or Options()
  if isinstance(spec, str):
    spec = eval_tasks.parse_spec(spec)
  check_options(opts)
  items, pool, pool_is_items = loaded or _load(spec, opts)
  if spec.kind == "perplexity" and opts.num_fewshot > 0:
    logging.warning("%s: perplexity tasks take no few-shot examples; ignoring --num_fewshot", spec.name)

  def shots_for(i: int, item: dict) -> list[str]:
    drawn = eval_tasks.draw_shots(pool, opts.num_fewshot, opts.seed, i, i if pool_is_items else None, item)
    return [eval_tasks.solved(spec.kind, s) for s in drawn]

  if opts.limit > 0:
    items = items[: opts.limit]
  job = _Job(model_cfg, params, tokenizer, opts, spec.name, draft)
  metrics, samples = RUNNERS[spec.kind](job, items, shots_for)
  return TaskResult(spec.name, metrics, samples)


def _unique_names(specs: list[eval_tasks.TaskSpec]) -> list[str]:
  names, seen = [], set()
  for s in specs:
    name = s.name if s.name not in seen else f"{s.name}_{s.kind}"
    n = 2
    while name in seen:
      name, n = f"{s.name}_{s.kind}_{n}", n + 1
    seen.add(name)
    names.append(name)
  return names


def evaluate_specs(
  model_cfg, params, tokenizer, task_specs: Sequence[str], options: Options
) -> list[TaskResult]:
  loaded = load_specs(task_specs, options)
  return [run_task(model_cfg, params, tokenizer, s, options, data) for s, data in loaded]


def load_specs(task_specs: Sequence[str], options: Options) -> list:
  """[(TaskSpec with a unique name, its loaded data)]: every task is read and checked before any runs."""
  check_options(options)
  specs = [eval_tasks.parse_spec(s) for s in task_specs]
  specs = [dataclasses.replace(s, name=n) for s, n in zip(specs, _unique_names(specs))]
  return [(s, _load(s, options)) for s in specs]


def run_tasks(
  model_cfg,
  params,
  tokenizer,
  task_specs: Sequence[str],
  *,
  batch_size: int,
  num_fewshot: int = 0,
  seed: int = 0,
  limit: int = 0,
  **options,
) -> dict[str, dict[str, float]]:
  """Task name -> metrics for `KIND:PATH` / `KIND:tfds:NAME[:SPLIT]` specs (other Options as keywords)."""
  opts = Options(batch_size=batch_size, num_fewshot=num_fewshot, seed=seed, limit=limit, **options)
  return {r.name: r.metrics for r in evaluate_specs(model_cfg, params, tokenizer, task_specs, opts)}


# -------------------------------------------------------------------- CLI


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "gpt_jax workdir (or params export) to evaluate.")
  flags.DEFINE_string("hf_dir", None, "Local Hugging Face GPT-2 folder to evaluate.")
  flags.DEFINE_multi_string("task", [], "KIND:PATH.jsonl or KIND:tfds:NAME[:SPLIT]; repeatable.")
  flags.DEFINE_integer("num_fewshot", 0, "Solved examples before each item (GPT-3 §2).")
  flags.DEFINE_string(
    "fewshot_file", "", "JSONL of few-shot examples (default: train split / the task file)."
  )
  flags.DEFINE_string("fewshot_separator", "\\n\\n", "Text between few-shot examples (\\n = newline).")
  flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
  flags.DEFINE_integer("stride", 0, "Perplexity sliding-window stride in tokens; 0 = block_size // 2.")
  flags.DEFINE_bool("unconditional_norm", False, "Also report acc_uncond (GPT-3 §2.4) for multiple choice.")
  flags.DEFINE_string("uncond_prompt", "Answer:", "Context of the unconditional probability for acc_uncond.")
  flags.DEFINE_multi_string("until", ["\\n"], "Stop strings for generate tasks (\\n = newline); repeatable.")
  flags.DEFINE_integer("max_gen_tokens", 32, "Maximum generated tokens per generate item.")
  flags.DEFINE_integer("seed", 0, "Seed of the few-shot draws.")
  flags.DEFINE_integer("limit", 0, "Evaluate only the first N items of each task (0 = all).")
  flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir holding prepared datasets (default: TFDS's).")
  flags.DEFINE_string("output", "", "Write results JSON here.")
  flags.DEFINE_string("samples_output", "", "Write one JSON line per evaluated item here.")
  speculative.define_flags()


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.task:
    raise UserError("give at least one --task=KIND:PATH")
  specs = [eval_tasks.parse_spec(s) for s in f.task]
  for path in [s.path for s in specs if s.path] + ([f.fewshot_file] if f.fewshot_file else []):
    if not os.path.isfile(path):
      raise UserError(f"{path}: no such file")
  for flag in ("output", "samples_output"):  # Fail now, not after the evaluation.
    folder = os.path.dirname(os.path.abspath(f[flag].value)) if f[flag].value else ""
    if folder and not os.path.isdir(folder):
      raise UserError(f"--{flag}={f[flag].value}: folder {folder} does not exist")
  opts = Options(
    batch_size=f.batch_size,
    num_fewshot=f.num_fewshot,
    seed=f.seed,
    limit=f.limit,
    stride=f.stride,
    unconditional_norm=f.unconditional_norm,
    uncond_prompt=f.uncond_prompt,
    fewshot_file=f.fewshot_file,
    fewshot_separator=eval_tasks.unescape(f.fewshot_separator),
    until=tuple(eval_tasks.unescape(u) for u in f.until),
    max_gen_tokens=f.max_gen_tokens,
    tfds_data_dir=f.tfds_data_dir,
    progress=True,
  )
  loaded = load_specs(f.task, opts)  # Bad task files and options fail here, before the model loads.
  model_cfg, params, tok = loading.load_for_inference(workdir=f.workdir, hf_dir=f.hf_dir, weights=f.weights)
  draft = speculative.draft_from_flags(model_cfg, tok)
  results = [run_task(model_cfg, params, tok, s, opts, data, draft) for s, data in loaded]
  table = {r.name: r.metrics for r in results}
  print(eval_tasks.format_table(table), flush=True)
  if f.output:
    run_config = {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"}
    run_config.update(workdir=f.workdir, hf_dir=f.hf_dir, tasks=list(f.task), model=model_cfg.to_dict())
    run_config.update(weights=f.weights, draft_workdir=f.draft_workdir, draft_hf_dir=f.draft_hf_dir)
    if draft is not None:
      run_config["draft_tokens"] = draft.tokens
    eval_tasks.write_json(f.output, {"tasks": table, "config": run_config})
  if f.samples_output:
    eval_tasks.write_json(
      f.samples_output, [{"task": r.name, **s} for r in results for s in r.samples], lines=True
    )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
