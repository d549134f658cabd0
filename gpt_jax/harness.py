"""lm-evaluation-harness adapter: gpt_jax models as the lm_eval model "gpt_jax".

    pip install lm_eval==0.4.13
    python -m gpt_jax.harness run --model gpt_jax --model_args hf_dir=/models/gpt2 \\
        --batch_size 16 --tasks lambada_openai,hellaswag --output_path results/

The wrapper registers the model, then runs lm_eval's own CLI with the same
arguments (lm_eval has no plugin hook). Model args: `workdir=DIR` or
`hf_dir=DIR`, and optionally `rolling_stride=N` (default block_size:
lm_eval's disjoint windows, so perplexities compare with its HF model).

lm_eval sends requests one task at a time and neither sorts nor batches
them; every request goes through gpt_jax.evaluate's scorer (length-sorted,
power-of-two padded batches, original order restored) or its KV-cache
generation. Context and continuation are tokenised separately, exactly as
gpt_jax.evaluate does (lm_eval's HF model splits a joint tokenisation; the
two differ only where BPE would merge across the boundary).
"""

from __future__ import annotations

import collections
import sys

# Imported before register_model: the registry fills itself with the built-in
# models on this import, and registering first would hide them.
import lm_eval.models  # noqa: F401
from absl import logging
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from gpt_jax import eval_tasks, evaluate, loading, model_config, speculative
from gpt_jax.errors import UserError

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's HF default.


def _batch_size(value) -> int:
  """lm_eval passes ints, numeric strings or "auto[:N]"; auto means our default."""
  if value is None or (isinstance(value, str) and value.startswith("auto")):
    return DEFAULT_BATCH_SIZE
  try:
    size = int(value)
  except (TypeError, ValueError):
    raise UserError(f"batch_size={value!r} must be a positive integer or 'auto'") from None
  if size <= 0:
    raise UserError(f"batch_size={value!r} must be a positive integer or 'auto'")
  return size


@register_model("gpt_jax")
class GptJaxLM(TemplateLM):
  """A gpt_jax model for lm_eval: from `workdir` or `hf_dir`, or given model_cfg, params and tokenizer."""

  def __init__(
    self,
    workdir: str | None = None,
    hf_dir: str | None = None,
    batch_size=DEFAULT_BATCH_SIZE,
    max_batch_size=None,
    device=None,
    rolling_stride: int = 0,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    draft_workdir: str | None = None,
    draft_hf_dir: str | None = None,
    draft_tokens=4,
    weights: str = "float32",
    *,
    model_cfg=None,
    params=None,
    tokenizer=None,
    draft=None,
    **unused,
  ):
    super().__init__()
    # lm_eval's --model_args arrive as strings.
    try:
      draft_tokens = int(draft_tokens)
    except (TypeError, ValueError):
      raise UserError(f"draft_tokens={draft_tokens!r} must be an integer >= 1") from None
    if model_cfg is None:
      model_cfg, params, tokenizer = loading.load_for_inference(
        workdir=workdir, hf_dir=hf_dir, weights=weights
      )
    model_cfg = model_config.of(model_cfg)
    if draft is None:
      draft = speculative.load_draft(
        model_cfg,
        tokenizer,
        workdir=draft_workdir,
        hf_dir=draft_hf_dir,
        draft_tokens=draft_tokens,
        weights=weights,
      )
    self.draft = draft
    if unused:
      logging.warning("gpt_jax model ignores these arguments: %s", ", ".join(sorted(unused)))
    if device not in (None, "", "cpu", "cuda", "tpu"):
      logging.info("gpt_jax model runs on JAX's devices; ignoring device=%s", device)
    del max_batch_size  # Batches are fixed-size; nothing to search for.
    self.model_cfg, self.params, self.tokenizer = model_cfg, params, tokenizer
    self._batch_size = _batch_size(batch_size)
    self.rolling_stride = int(rolling_stride) or model_cfg.block_size
    if not 1 <= self.rolling_stride <= model_cfg.block_size:
      raise UserError(f"rolling_stride={rolling_stride} must be in [1, block_size={model_cfg.block_size}]")
    self._max_gen_toks = int(max_gen_toks)

  # ------------------------------------------------------------ properties

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eot_id

  @property
  def max_length(self) -> int:
    return self.model_cfg.block_size

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return f"gpt_jax-{getattr(self.tokenizer, 'fingerprint', self.tokenizer.vocab_size)}"

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    return self.tokenizer.encode(string)

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    return eval_tasks.encode_pair(self.tokenizer, context, continuation)

  # -------------------------------------------------------------- requests

  def _score(self, requests, disable_tqdm: bool, desc: str) -> list[evaluate.Score]:
    return evaluate.score_requests(
      self.model_cfg, self.params, requests, batch_size=self.batch_size, progress=not disable_tqdm, desc=desc
    )

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    scores = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm, "loglikelihood")
    out = []
    for (key, _, _), s in zip(requests, scores):
      answer = (s.logprob, s.is_greedy)
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole texts from EOT, each token scored once (gpt_jax.eval_tasks.rolling_windows)."""
    windows, owner = [], []
    for n, req in enumerate(requests):
      (text,) = req.args
      for w in eval_tasks.rolling_windows(
        [self.eot_token_id, *self.tok_encode(text)], self.max_length, self.rolling_stride
      ):
        windows.append(w)
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, s in zip(owner, self._score(windows, disable_tqdm, "loglikelihood_rolling")):
      totals[n] += s.logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample) continuations, cut before the first stop string."""
    groups = collections.defaultdict(list)  # Requests sharing generation settings run together.
    for n, req in enumerate(requests):
      context, gen_kwargs = req.args
      kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
      # No EOT string among the stops: generation already ends at the EOT token.
      until = tuple(handle_stop_sequences(kwargs.pop("until", None), eos=None))
      max_new = min(int(kwargs.pop("max_gen_toks")), self.max_length - 1)
      sampling = {
        "temperature": float(kwargs.pop("temperature", 0.0) if kwargs.pop("do_sample", False) else 0.0)
      }
      for k in ("top_k", "top_p", "seed"):
        if k in kwargs:
          sampling[k] = kwargs.pop(k)
      key = (until, max_new, tuple(sorted(sampling.items())))
      groups[key].append((n, context))
    out = [""] * len(requests)
    for (until, max_new, sampling), members in groups.items():
      room = self.max_length - max_new
      prompts = [(self.tok_encode(c) or [self.eot_token_id])[-room:] for _, c in members]
      texts = evaluate.generate_texts(
        self.model_cfg,
        self.params,
        self.tokenizer,
        prompts,
        until=until,
        max_new_tokens=max_new,
        batch_size=self.batch_size,
        progress=not disable_tqdm,
        desc="generate_until",
        draft=self.draft,
        **dict(sampling),
      )
      for (n, _), text in zip(members, texts):
        out[n] = text
        self.cache_hook.add_partial("generate_until", requests[n].args, text)
    return out


def main() -> None:
  """`python -m gpt_jax.harness <lm_eval CLI args>`: lm_eval's CLI with "gpt_jax" registered."""
  from lm_eval.__main__ import cli_evaluate

  try:
    cli_evaluate()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  main()
