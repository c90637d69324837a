"""Text -> tokens -> packed fixed-length sequences with segment ids, served by a checkpointable grain pipeline.

Pipeline (all deterministic in the seed):

1. `read_documents`: documents from jsonl/parquet/plain files, or the embedded default corpus (this Python's
   standard library sources, which include the pydoc topics text): no downloads.
2. `split_heldout`: a document goes to the held-out split by a hash of its text, so the split never depends on order.
3. `load_or_train_tokenizer`: a given `tokenizer.json`, or a byte-level BPE trained on the training split (cached).
4. `pretokenize`: every document + EOS, concatenated into one token stream on disk (`tokens.npy`, with
   `doc_starts.npy`): the pre-tokenised shard the loader reads by memory map.
5. `PackedSequences`: random access to window i = stream[i (T+1) : (i+1) (T+1)]; inputs are the first T tokens,
   targets the last T. Segment ids (1, 2, ... inside a window) mark documents, so the model resets the GDN-2 state
   and the short convs at every document start; the loss mask drops targets that belong to the next document.
6. `make_train_iterator`: grain MapDataset: shuffle (reshuffled every epoch) -> repeat -> this process's share
   -> batch. Its iterator's `get_state()`/`set_state()` is what checkpoints save and resume restores exactly.

Steps 1-4 hold the corpus in memory; for corpora larger than memory, `data.streaming=true` (or a `data.path` that is
a token store) streams it into memory-mapped shards instead (`train/token_store.py`), read by the same step 6.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
from typing import Iterator, Optional

import numpy as np

from train.config import ConfigError, DataConfig

log = logging.getLogger("train")

EOS = "<|endoftext|>"
PLAIN_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
  """Bad data input; the message is one line saying what to fix."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Documents


def stdlib_files() -> list[str]:
  """This Python's standard-library `.py` files (site-packages and caches excluded), in a fixed hashed order.

  The hashed order spreads a size-capped corpus over the whole library instead of its alphabetical start.
  """
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
    for name in filenames:
      if name.endswith(".py"):
        files.append(os.path.join(dirpath, name))
  return sorted(files, key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode()).hexdigest())


def resolve_paths(path: str) -> list[str]:
  """The data files named by `path` (a file, a directory searched recursively, or a glob)."""
  if any(c in path for c in "*?["):
    files = sorted(glob.glob(path, recursive=True))
  elif os.path.isdir(path):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
  elif os.path.isfile(path):
    files = [path]
  else:
    raise DataError(f"data.path {path!r} does not exist; point data.path at a file, directory or glob of "
                    f".jsonl/.parquet/.txt files, or leave it unset for the embedded corpus.")
  files = [f for f in files if f.endswith(JSON_SUFFIXES + (".parquet",) + PLAIN_SUFFIXES)]
  if not files:
    raise DataError(f"data.path {path!r} holds no .jsonl/.json/.parquet/.txt/.md/.py/.rst files; add some or "
                    f"point data.path elsewhere.")
  return files


def jsonl_text(line: str, field: str, where: str) -> str:
  """The text field of one stripped, non-empty .jsonl line; `where` (file and line or byte) names it in errors."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    raise DataError(f"{where} is not valid JSON; every line of a .jsonl file must be one object.") from None
  if not isinstance(row, dict) or field not in row:
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where} has no field {field!r} (found {keys}); set data.text_field.")
  return str(row[field])


def _read_jsonl(path: str, field: str) -> Iterator[str]:
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if line:
        yield jsonl_text(line, field, f"{path}:{lineno}")


def parquet_file(path: str):
  """`pyarrow.parquet.ParquetFile` of `path`, or a one-line `DataError` (pyarrow missing, file unreadable)."""
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"reading {path} needs pyarrow; `pip install pyarrow` or convert the data to .jsonl.") from None
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 -- pyarrow's errors for unreadable files vary by version
    raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]}).") from None


def _read_parquet(path: str, field: str) -> Iterator[str]:
  pf = parquet_file(path)
  if field not in pf.schema_arrow.names:
    raise DataError(f"{path} has no column {field!r} (found {pf.schema_arrow.names}); set data.text_field.")
  for batch in pf.iter_batches(columns=[field]):
    for text in batch.column(0).to_pylist():
      if text is not None:
        yield str(text)


def _read_file(path: str, field: str) -> Iterator[str]:
  if path.endswith(JSON_SUFFIXES):
    yield from _read_jsonl(path, field)
  elif path.endswith(".parquet"):
    yield from _read_parquet(path, field)
  else:
    with open(path, encoding="utf-8", errors="replace") as f:
      yield f.read()


def read_documents(cfg: DataConfig) -> tuple[list[str], str]:
  """Reads up to `cfg.max_corpus_mb` of documents. Returns `(documents, fingerprint)`.

  The fingerprint names the inputs (files, sizes, modification times, cap, field) so caches follow the data.
  """
  if cfg.path is None:
    files = stdlib_files()
    field = "text"
  else:
    files = resolve_paths(cfg.path)
    field = cfg.text_field
  cap = int(cfg.max_corpus_mb * 2**20)
  docs, total, used = [], 0, []
  for path in files:
    for text in _read_file(path, field):
      if not text.strip():
        continue
      docs.append(text)
      total += len(text)
      if total >= cap:
        break
    used.append(path)
    if total >= cap:
      break
  if not docs:
    where = cfg.path if cfg.path is not None else sysconfig.get_paths()["stdlib"]
    raise DataError(f"the corpus at {where!r} is empty (no non-blank documents); add text or fix data.path/"
                    f"data.text_field.")
  h = hashlib.sha1()
  for path in used:
    st = os.stat(path)
    h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  h.update(f"{cap}|{field}|{len(docs)}".encode())
  return docs, h.hexdigest()[:16]


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
  """Splits documents into (train, heldout) by a hash of their text; both are non-empty when there are >= 2."""
  if not 0.0 <= fraction < 1.0:
    raise ConfigError(f"data.heldout_fraction is {fraction}; expected a value in [0, 1).")
  train, held = [], []
  for d in docs:
    bucket = int(hashlib.md5(d.encode("utf-8", "replace")).hexdigest()[:8], 16) / 0xFFFFFFFF
    (held if bucket < fraction else train).append(d)
  if fraction > 0 and not held and len(train) > 1:
    held.append(train.pop())
  if not train:
    raise DataError("every document went to the held-out split; lower data.heldout_fraction or add documents.")
  return train, held


# ---------------------------------------------------------------------------------------------------------------
# 2. Tokenizer


def train_bpe(docs: list[str], vocab_size: int):
  """A byte-level BPE (`tokenizers`) trained on `docs`, with EOS as special token 0."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(docs, trainer, length=len(docs))
  return tok


def load_or_train_tokenizer(cfg: DataConfig, train_docs: list[str], fingerprint: str):
  """Loads `cfg.tokenizer`, or trains (and caches under `cfg.cache_dir`) a BPE of `cfg.vocab_size`."""
  from tokenizers import Tokenizer
  if cfg.tokenizer is not None:
    if not os.path.isfile(cfg.tokenizer):
      raise DataError(f"data.tokenizer {cfg.tokenizer!r} not found; give a tokenizer.json or leave it unset to "
                      f"train a BPE on the corpus.")
    return Tokenizer.from_file(cfg.tokenizer)
  path = os.path.join(cfg.cache_dir, f"bpe-{fingerprint}-{cfg.vocab_size}.json")
  if os.path.isfile(path):
    return Tokenizer.from_file(path)
  log.info("training a byte-level BPE of %d tokens on %d documents", cfg.vocab_size, len(train_docs))
  tok = train_bpe(train_docs, cfg.vocab_size)
  os.makedirs(cfg.cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
  return Tokenizer.from_file(path)


def eos_id(tokenizer) -> int:
  """The id of the end-of-document token (EOS, else the tokenizer's first special token, else 0)."""
  i = tokenizer.token_to_id(EOS)
  if i is None:
    for name in ("</s>", "<eos>", "<|end_of_text|>", "[SEP]"):
      i = tokenizer.token_to_id(name)
      if i is not None:
        break
  return 0 if i is None else int(i)


def tokenizer_hash(tokenizer) -> str:
  return hashlib.sha1(tokenizer.to_str().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# 3. Pre-tokenised shards


@dataclasses.dataclass(frozen=True)
class TokenShard:
  """A pre-tokenised split on disk: `tokens [N] int32` (documents + EOS back to back) and `doc_starts [D]`."""

  tokens: np.ndarray
  doc_starts: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])


def pretokenize(docs: list[str], tokenizer, path: str, seed: int) -> TokenShard:
  """Tokenises `docs` (shuffled once by `seed`), each followed by EOS, into `path/{tokens,doc_starts}.npy`.

  Reuses the files when they exist (the path carries the hash of corpus, tokenizer and seed). Arrays are
  memory-mapped on load, so every host reads only the windows it serves.
  """
  tok_file, start_file = os.path.join(path, "tokens.npy"), os.path.join(path, "doc_starts.npy")
  if not (os.path.isfile(tok_file) and os.path.isfile(start_file)):
    order = np.random.default_rng(seed).permutation(len(docs))
    eos = eos_id(tokenizer)
    encoded = tokenizer.encode_batch([docs[i] for i in order], add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encoded], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.empty(int(lengths.sum()), np.int32)
    for s, e in zip(starts, encoded):
      tokens[s:s + len(e.ids)] = e.ids
      tokens[s + len(e.ids)] = eos
    os.makedirs(path, exist_ok=True)
    for name, arr in ((tok_file, tokens), (start_file, starts)):
      tmp = f"{name}.tmp{os.getpid()}.npy"
      np.save(tmp, arr)
      os.replace(tmp, name)
  return TokenShard(np.load(tok_file, mmap_mode="r"), np.load(start_file))


# ---------------------------------------------------------------------------------------------------------------
# 4. Packing


class PackedSequences:
  """Random-access packed windows of a token stream (a grain data source: `__len__` and `__getitem__`).

  Element i is a dict of `[T]` arrays:
    tokens (int32): stream[i (T+1) : i (T+1) + T]
    targets (int32): the next token of each position
    segment_ids (int32): 1 for the first document in the window, 2 for the next, ...
    loss_mask (float32): 1 where the target is in the same document as the input (0 across a boundary)
  """

  def __init__(self, shard: TokenShard, seq_len: int):
    self.shard, self.seq_len = shard, seq_len
    self._len = shard.num_tokens // (seq_len + 1)
    if self._len == 0:
      raise DataError(f"the split has {shard.num_tokens} tokens, fewer than one sequence of data.seq_len + 1 = "
                      f"{seq_len + 1}; add text, raise data.max_corpus_mb or lower data.seq_len.")

  def __len__(self) -> int:
    return self._len

  @property
  def num_tokens(self) -> int:
    return self.shard.num_tokens

  def head(self, n: int) -> np.ndarray:
    """The first `n` tokens of the stream `[min(n, num_tokens)]`."""
    return np.asarray(self.shard.tokens[:n])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i) % self._len
    T = self.seq_len
    lo = i * (T + 1)
    window = np.asarray(self.shard.tokens[lo:lo + T + 1], dtype=np.int32)
    doc = np.searchsorted(self.shard.doc_starts, np.arange(lo, lo + T + 1), side="right")
    seg = (doc - doc[0] + 1).astype(np.int32)
    return {
        "tokens": window[:-1].copy(),
        "targets": window[1:].copy(),
        "segment_ids": seg[:-1].copy(),
        "loss_mask": (seg[1:] == seg[:-1]).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------------------
# 5. grain pipelines


def make_train_dataset(source: PackedSequences, *, batch_per_process: int, seed: int, shuffle: bool,
                       process_index: int = 0, process_count: int = 1, read_threads: int = 2, prefetch: int = 8):
  """grain IterDataset of `{name: [batch_per_process, T]}` batches: endless, reshuffled every epoch.

  Each process takes every `process_count`-th element, offset by its index, so hosts never overlap.
  """
  import grain
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)  # endless; `shuffle` above is reseeded per epoch
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = ds.batch(batch_per_process, drop_remainder=True)
  options = grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=max(1, prefetch))
  return ds.to_iter_dataset(options)


def make_eval_batches(source: PackedSequences, *, batch_per_process: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` held-out batches (fixed, unshuffled; fewer if the split is small, at least one)."""
  import grain
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  n = max(1, min(num_batches, len(ds) // batch_per_process))
  ds = ds.repeat(None).batch(batch_per_process, drop_remainder=True)
  return [ds[i] for i in range(n)]


@dataclasses.dataclass
class Corpus:
  """Everything the loop needs from the data side."""

  tokenizer: object
  vocab_size: int
  train: PackedSequences
  heldout: Optional[PackedSequences]
  fingerprint: str


def build_corpus(cfg: DataConfig) -> Corpus:
  """Reads, splits, tokenises (cached) and packs the corpus described by `cfg`.

  With `cfg.streaming`, or a `cfg.path` that is a token store, the corpus streams from a token store instead
  (`train.token_store.build_store_corpus`): nothing is held in memory.
  """
  from train import token_store
  if cfg.streaming or token_store.is_store(cfg.path):
    return token_store.build_store_corpus(cfg)
  if cfg.seq_len < 2:
    raise ConfigError(f"data.seq_len is {cfg.seq_len}; expected at least 2.")
  docs, fingerprint = read_documents(cfg)
  train_docs, held_docs = split_heldout(docs, cfg.heldout_fraction)
  tokenizer = load_or_train_tokenizer(cfg, train_docs, fingerprint)
  key = f"{fingerprint}-{tokenizer_hash(tokenizer)}-{cfg.seed}"
  train = PackedSequences(pretokenize(train_docs, tokenizer, os.path.join(cfg.cache_dir, key, "train"), cfg.seed),
                          cfg.seq_len)
  heldout = None
  if held_docs:
    shard = pretokenize(held_docs, tokenizer, os.path.join(cfg.cache_dir, key, "heldout"), cfg.seed)
    if shard.num_tokens > cfg.seq_len:
      heldout = PackedSequences(shard, cfg.seq_len)
  return Corpus(tokenizer, tokenizer.get_vocab_size(), train, heldout, key)
