"""Token stores: a corpus of any size tokenised once, shard by shard, into flat memory-mapped token files.

`train/data.py` holds its documents in a Python list, which caps the corpus at what fits in memory. A token store
streams instead: documents are read one at a time (JSONL line by line, Parquet by record batch), tokenised in
batches by worker processes, one input shard each, and appended to flat binary files; training reads windows of
them through `np.memmap`, so memory stays flat as the corpus grows (tested) and every host reads only the pages of
the windows it serves (`make_train_dataset` gives each process every `process_count`-th window).

Layout of a store directory (all integers little-endian):

    index.json                 {"format": "gdn2-token-store", "version": 1, "dtype": "uint16" | "uint32",
                                "eos_id", "vocab_size", "tokenizer_sha1",
                                "splits": {"train": [SHARD, ...], "heldout": [SHARD, ...]}}
                               SHARD = {"name": "00007", "num_tokens": N, "num_docs": D}
    tokenizer.json             the tokenizer every shard was written with
    train/00007.tokens         N tokens of `dtype`: documents back to back, each followed by EOS
    train/00007.docs           D uint64: the offset of each document's first token inside the shard
    heldout/00007.*            the same for the held-out split (a document goes there by a hash of its text, the
                               rule of `data.split_heldout`)
    shards/00007.json          written last for each input shard ({"source", counts}): a rerun skips it

A shard's files are written under temporary names and renamed when complete, the index last, so an interrupted
write resumes where it stopped and a store with an index is always complete. Input shards: a JSONL file is split
into byte ranges of `shard_mb` (a range owns the lines that start inside it); a Parquet file into runs of whole row
groups of about `shard_mb` (by their uncompressed size); a plain-text file is one shard (one document per file).

    python -m train.token_store 'data/*.jsonl' --tokenizer tokenizer.json --out /data/store --workers 16
    python -m train.main data.path=/data/store ...      # a store directory as the corpus

`build_corpus` builds a store by itself (under `data.cache_dir`) when `data.streaming=true`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np

from train.data import DataError, PLAIN_SUFFIXES, JSON_SUFFIXES, eos_id, jsonl_text, parquet_file, resolve_paths

log = logging.getLogger("train")

FORMAT, VERSION = "gdn2-token-store", 1
SPLITS = ("train", "heldout")
DOCS_PER_BATCH = 512  # documents tokenised per `encode_batch` call: bounds a worker's memory


# ---------------------------------------------------------------------------------------------------------------
# Input shards


@dataclasses.dataclass(frozen=True)
class InputShard:
  """Bytes `[start, end)` of `path` (a JSONL range owns the lines that start in it); row groups `[start, end)` of a
  Parquet file; a plain-text file whole."""

  index: int
  path: str
  start: int
  end: int

  @property
  def name(self) -> str:
    return f"{self.index:05d}"

  @property
  def source(self) -> str:
    return f"{self.path}[{self.start}:{self.end}]"


def plan_shards(files: Sequence[str], *, shard_mb: float, max_mb: Optional[float] = None) -> list[InputShard]:
  """Input shards of `files` in order: JSONL files cut into `shard_mb` byte ranges, Parquet files into runs of row
  groups of about `shard_mb`; at most `max_mb` bytes in all (JSONL and plain text: bytes on disk; Parquet: whole
  files, counted by their size on disk)."""
  step = max(1, int(shard_mb * 2**20))
  budget = None if max_mb is None else int(max_mb * 2**20)
  out: list[InputShard] = []
  for path in files:
    size = os.path.getsize(path)
    if path.endswith(".parquet"):
      for lo, hi in _row_group_runs(path, step):
        out.append(InputShard(len(out), path, lo, hi))
    else:
      if budget is not None:
        size = min(size, budget)
      cuts = range(0, size, step) if path.endswith(JSON_SUFFIXES) else range(0, size, max(size, 1))
      for lo in cuts:
        out.append(InputShard(len(out), path, lo, min(size, lo + step) if path.endswith(JSON_SUFFIXES) else size))
    if budget is not None:
      budget -= size
      if budget <= 0:
        break
  return out


def _row_group_runs(path: str, step: int) -> list[tuple[int, int]]:
  """Runs `[lo, hi)` of consecutive row groups of `path`, each of about `step` bytes (uncompressed) or one group."""
  meta = parquet_file(path).metadata
  runs, lo, acc = [], 0, 0
  for i in range(meta.num_row_groups):
    acc += meta.row_group(i).total_byte_size
    if acc >= step:
      runs.append((lo, i + 1))
      lo, acc = i + 1, 0
  if lo < meta.num_row_groups:
    runs.append((lo, meta.num_row_groups))
  return runs


def iter_documents(shard: InputShard, field: str) -> Iterator[str]:
  """The non-blank documents of `shard`, read one at a time."""
  if shard.path.endswith(JSON_SUFFIXES):
    yield from _jsonl_range(shard, field)
  elif shard.path.endswith(".parquet"):
    yield from _parquet_batches(shard, field)
  else:
    with open(shard.path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if text.strip():
      yield text


def _jsonl_range(shard: InputShard, field: str) -> Iterator[str]:
  with open(shard.path, "rb") as f:
    if shard.start > 0:
      f.seek(shard.start - 1)
      f.readline()  # the line running into the range belongs to the range before
    while True:
      pos = f.tell()
      if pos >= shard.end:
        return
      line = f.readline()
      if not line:
        return
      line = line.strip()
      if not line:
        continue
      text = jsonl_text(line, field, f"{shard.path} at byte {pos}")
      if text.strip():
        yield text


def _parquet_batches(shard: InputShard, field: str) -> Iterator[str]:
  pf = parquet_file(shard.path)
  if field not in pf.schema_arrow.names:
    raise DataError(f"{shard.path} has no column {field!r} (found {pf.schema_arrow.names}); set data.text_field.")
  groups = list(range(shard.start, shard.end))
  for batch in pf.iter_batches(row_groups=groups, columns=[field], batch_size=DOCS_PER_BATCH):
    for text in batch.column(0).to_pylist():
      if text is not None and str(text).strip():
        yield str(text)


def is_heldout(text: str, fraction: float) -> bool:
  """The held-out rule of `data.split_heldout`: a hash of the text below `fraction`."""
  return int(hashlib.md5(text.encode("utf-8", "replace")).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


# ---------------------------------------------------------------------------------------------------------------
# Writing


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
  """Appends documents (token ids + EOS) of one split to `DIR/<split>/<name>.{tokens,docs}` (temporary until
  `close`)."""

  def __init__(self, store: str, split: str, name: str, dtype: np.dtype, eos: int):
    os.makedirs(os.path.join(store, split), exist_ok=True)
    self.final = [os.path.join(store, split, f"{name}.{kind}") for kind in ("tokens", "docs")]
    self.tmp = [f"{p}.tmp{os.getpid()}" for p in self.final]
    self.files = [open(p, "wb") for p in self.tmp]
    self.dtype, self.eos = dtype, eos
    self.num_tokens = self.num_docs = 0

  def add(self, docs_ids: Sequence[Sequence[int]]) -> None:
    if not docs_ids:
      return
    lengths = np.fromiter((len(d) + 1 for d in docs_ids), np.int64, len(docs_ids))
    starts = self.num_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.empty(int(lengths.sum()), self.dtype)
    ends = np.cumsum(lengths)
    for s, e, ids in zip(starts - self.num_tokens, ends, docs_ids):
      flat[s:e - 1] = ids
      flat[e - 1] = self.eos
    self.files[0].write(flat.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes())
    self.files[1].write(starts.astype("<u8").tobytes())
    self.num_tokens += int(lengths.sum())
    self.num_docs += len(docs_ids)

  def close(self) -> dict:
    for f in self.files:
      f.close()
    for tmp, final in zip(self.tmp, self.final):
      if self.num_tokens:
        os.replace(tmp, final)
      else:  # an empty split of this shard (every document went to the other one): no files
        os.remove(tmp)
    return {"num_tokens": self.num_tokens, "num_docs": self.num_docs}


def write_shard_arrays(store: str, split: str, name: str, tokens: np.ndarray, doc_starts: np.ndarray) -> dict:
  """Writes one shard from arrays (tests and converters); the same files `ShardWriter` writes."""
  os.makedirs(os.path.join(store, split), exist_ok=True)
  for kind, arr in (("tokens", tokens), ("docs", np.asarray(doc_starts, "<u8"))):
    path = os.path.join(store, split, f"{name}.{kind}")
    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
  return {"name": name, "num_tokens": int(tokens.shape[0]), "num_docs": int(len(doc_starts))}


def tokenize_shard(shard: InputShard, tokenizer_json: str, store: str, field: str, heldout_fraction: float,
                   vocab_size: int) -> dict:
  """Tokenises one input shard into both splits of `store` and marks it done; returns its record."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_str(tokenizer_json)
  dtype, eos = token_dtype(vocab_size), eos_id(tok)
  writers = {s: ShardWriter(store, s, shard.name, dtype, eos) for s in SPLITS}
  batch: dict[str, list[str]] = {s: [] for s in SPLITS}
  nbytes = 0

  def flush(split):
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster, smaller
    writers[split].add([e.ids for e in encode(batch[split], add_special_tokens=False)])
    batch[split].clear()

  for text in iter_documents(shard, field):
    split = "heldout" if is_heldout(text, heldout_fraction) else "train"
    batch[split].append(text)
    nbytes += len(text)
    if len(batch[split]) >= DOCS_PER_BATCH:
      flush(split)
  record = {"source": shard.source, "text_bytes": nbytes}
  for s in SPLITS:
    flush(s)
    record[s] = writers[s].close()
  os.makedirs(os.path.join(store, "shards"), exist_ok=True)
  marker = os.path.join(store, "shards", f"{shard.name}.json")
  with open(f"{marker}.tmp{os.getpid()}", "w") as f:
    json.dump(record, f)
  os.replace(f"{marker}.tmp{os.getpid()}", marker)
  return record


def _worker_init() -> None:
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def _tokenize_star(args) -> tuple[str, dict]:
  return args[0].name, tokenize_shard(*args)


def write_store(files: Sequence[str], tokenizer, store: str, *, field: str = "text", heldout_fraction: float = 0.0,
                shard_mb: float = 256.0, max_mb: Optional[float] = None, workers: int = 1) -> dict:
  """Tokenises `files` into the token store `store` (resuming a partial one); returns its index.

  `workers` > 1 tokenises that many input shards at once in spawned processes (0: one per CPU). Progress: one log
  line per finished shard (tokens, MB/s, how many remain).
  """
  index_path = os.path.join(store, "index.json")
  tok_json = tokenizer.to_str()
  if os.path.isfile(index_path):
    index = read_index(store)
    if index.get("tokenizer_sha1") != hashlib.sha1(tok_json.encode()).hexdigest():
      raise DataError(f"the token store {store} was written with another tokenizer; write this one to a new "
                      "directory, or use the store's own tokenizer.json.")
    return index
  if not 0.0 <= heldout_fraction < 1.0:
    raise DataError(f"heldout_fraction is {heldout_fraction}; expected a value in [0, 1).")
  os.makedirs(store, exist_ok=True)
  vocab = tokenizer.get_vocab_size()
  shards = plan_shards(files, shard_mb=shard_mb, max_mb=max_mb)
  done = {}
  for s in shards:
    marker = os.path.join(store, "shards", f"{s.name}.json")
    if os.path.isfile(marker):
      with open(marker) as f:
        rec = json.load(f)
      if rec.get("source") == s.source:
        done[s.name] = rec
  todo = [s for s in shards if s.name not in done]
  if done:
    log.info("token store %s: %d of %d shards already written, %d to go", store, len(done), len(shards), len(todo))
  workers = (os.cpu_count() or 1) if workers == 0 else workers
  args = [(s, tok_json, store, field, heldout_fraction, vocab) for s in todo]
  t0, nbytes = time.time(), 0

  def report(name, rec):
    nonlocal nbytes
    done[name] = rec
    nbytes += rec["text_bytes"]
    log.info("tokenised shard %s (%d of %d): %d tokens, %.1f MB/s", name, len(done), len(shards),
             rec["train"]["num_tokens"] + rec["heldout"]["num_tokens"], nbytes / 2**20 / max(time.time() - t0, 1e-9))

  if workers > 1 and len(todo) > 1:
    import concurrent.futures
    import multiprocessing
    # spawn: a forked child of a process that runs JAX or tokenizers' threads can deadlock.
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context(
        "spawn"), initializer=_worker_init) as pool:
      for name, rec in pool.map(_tokenize_star, args):
        report(name, rec)
  else:
    for a in args:
      report(*_tokenize_star(a))
  index = {"format": FORMAT, "version": VERSION, "dtype": token_dtype(vocab).name, "eos_id": eos_id(tokenizer),
           "vocab_size": vocab, "tokenizer_sha1": hashlib.sha1(tok_json.encode()).hexdigest(),
           "splits": {sp: [{"name": s.name, **done[s.name][sp]} for s in shards if done[s.name][sp]["num_tokens"]]
                      for sp in SPLITS}}
  tokenizer.save(os.path.join(store, "tokenizer.json"))
  write_index(store, index)
  return index


def write_index(store: str, index: dict) -> None:
  path = os.path.join(store, "index.json")
  with open(f"{path}.tmp{os.getpid()}", "w") as f:
    json.dump(index, f, indent=1)
  os.replace(f"{path}.tmp{os.getpid()}", path)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def is_store(path: Optional[str]) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "index.json"))


def read_index(store: str) -> dict:
  try:
    with open(os.path.join(store, "index.json")) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{store}/index.json cannot be read ({e}); write the store again with "
                    "`python -m train.token_store`.") from None
  if index.get("format") != FORMAT or index.get("version") != VERSION:
    raise DataError(f"{store}/index.json is not a {FORMAT} v{VERSION} index (format {index.get('format')!r}, version "
                    f"{index.get('version')!r}); write the store again with `python -m train.token_store`.")
  return index


class StoreSequences:
  """Packed windows of one split of a token store (a grain data source), read through `np.memmap`.

  The split's shards form one stream; element i is window `stream[i (T+1) : (i+1)(T+1)]` (it may span shards) as
  the same dict of `[T]` arrays as `data.PackedSequences`: tokens, targets (int32), segment_ids (int32, 1 for the
  window's first document, 2 for the next, ...) and loss_mask (float32, 0 where the target starts a new document).
  Nothing is read until a window is asked for, and then only that window's pages.
  """

  def __init__(self, store: str, split: str, seq_len: int):
    index = read_index(store)
    self.store, self.split, self.seq_len = store, split, seq_len
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    shards = index["splits"].get(split, [])
    self.tokens = [np.memmap(os.path.join(store, split, f"{s['name']}.tokens"), dtype, "r", shape=(s["num_tokens"],))
                   for s in shards]
    self.docs = [np.memmap(os.path.join(store, split, f"{s['name']}.docs"), "<u8", "r", shape=(s["num_docs"],))
                 for s in shards]
    self.offsets = np.concatenate([[0], np.cumsum([s["num_tokens"] for s in shards], dtype=np.int64)])
    self._len = self.num_tokens // (seq_len + 1)
    if self._len == 0:
      raise DataError(f"the {split} split of {store} has {self.num_tokens} tokens, fewer than one sequence of "
                      f"data.seq_len + 1 = {seq_len + 1}; add text or lower data.seq_len.")

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  def __len__(self) -> int:
    return self._len

  def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens [hi - lo] int32, document starts in [lo, hi) as stream offsets)`."""
    out = np.empty(hi - lo, np.int32)
    starts = []
    s = int(np.searchsorted(self.offsets, lo, side="right")) - 1
    pos = lo
    while pos < hi:
      base, end = int(self.offsets[s]), min(hi, int(self.offsets[s + 1]))
      out[pos - lo:end - lo] = self.tokens[s][pos - base:end - base]
      d = self.docs[s]
      # A binary search touches a few pages of the offsets; the probe's dtype must be d's, or numpy converts all of d.
      a, b = np.searchsorted(d, np.array([pos - base, end - base], d.dtype))
      starts.append(np.asarray(d[a:b], np.int64) + base)
      pos, s = end, s + 1
    return out, np.concatenate(starts) if starts else np.zeros(0, np.int64)

  def head(self, n: int) -> np.ndarray:
    return self.read(0, min(n, self.num_tokens))[0]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i) % self._len
    T = self.seq_len
    lo = i * (T + 1)
    window, starts = self.read(lo, lo + T + 1)
    new_doc = np.zeros(T + 1, np.int32)
    new_doc[starts - lo] = 1
    new_doc[0] = 0
    seg = 1 + np.cumsum(new_doc, dtype=np.int32)
    return {
        "tokens": window[:-1].copy(),
        "targets": window[1:].copy(),
        "segment_ids": seg[:-1].copy(),
        "loss_mask": (seg[1:] == seg[:-1]).astype(np.float32),
    }


def open_store(store: str):
  """`(tokenizer, index)` of a written store."""
  from tokenizers import Tokenizer
  index = read_index(store)
  return Tokenizer.from_file(os.path.join(store, "tokenizer.json")), index


# ---------------------------------------------------------------------------------------------------------------
# The corpus of a streaming run


def input_fingerprint(files: Sequence[str], *extra) -> str:
  h = hashlib.sha1()
  for path in files:
    st = os.stat(path)
    h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  h.update("|".join(map(str, extra)).encode())
  return h.hexdigest()[:16]


def build_store_corpus(cfg):
  """The `data.Corpus` of `cfg` from a token store: `data.path` itself when it is one, else one written (once)
  under `data.cache_dir` from `data.path` shard by shard. The tokenizer: the store's, `data.tokenizer`, or a BPE
  trained on the first `data.tokenizer_sample_mb` of the corpus."""
  from train import data
  if cfg.seq_len < 2:
    raise data.ConfigError(f"data.seq_len is {cfg.seq_len}; expected at least 2.")
  if is_store(cfg.path):
    store = cfg.path
    tokenizer, _ = open_store(store)
  else:
    files = data.stdlib_files() if cfg.path is None else data.resolve_paths(cfg.path)
    field = "text" if cfg.path is None else cfg.text_field
    if cfg.tokenizer is None:
      sample = dataclasses.replace(cfg, max_corpus_mb=min(cfg.max_corpus_mb, cfg.tokenizer_sample_mb))
      docs, fingerprint = data.read_documents(sample)
      train_docs, _ = data.split_heldout(docs, cfg.heldout_fraction)
      tokenizer = data.load_or_train_tokenizer(cfg, train_docs, fingerprint)
      del docs, train_docs
    else:
      tokenizer = data.load_or_train_tokenizer(cfg, [], "")
    key = input_fingerprint(files, cfg.max_corpus_mb, field, cfg.heldout_fraction, cfg.shard_mb,
                            data.tokenizer_hash(tokenizer))
    store = os.path.join(cfg.cache_dir, f"store-{key}")
    write_store(files, tokenizer, store, field=field, heldout_fraction=cfg.heldout_fraction, shard_mb=cfg.shard_mb,
                max_mb=cfg.max_corpus_mb, workers=cfg.tokenize_workers)
  train = StoreSequences(store, "train", cfg.seq_len)
  heldout = None
  if read_index(store)["splits"].get("heldout"):
    try:
      heldout = StoreSequences(store, "heldout", cfg.seq_len)
    except DataError:  # fewer held-out tokens than one window
      heldout = None
  return data.Corpus(tokenizer, tokenizer.get_vocab_size(), train, heldout, os.path.basename(store))


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m train.token_store", description=__doc__.split("\n\n")[0])
  ap.add_argument("inputs", nargs="+", help="files, directories or globs of .jsonl/.parquet/.txt files")
  ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
  ap.add_argument("--out", required=True, help="store directory (a partial one is resumed)")
  ap.add_argument("--text-field", default="text")
  ap.add_argument("--heldout-fraction", type=float, default=0.0)
  ap.add_argument("--shard-mb", type=float, default=256.0, help="JSONL bytes per input shard")
  ap.add_argument("--workers", type=int, default=0, help="tokenising processes (0: one per CPU)")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    from tokenizers import Tokenizer
    if not os.path.isfile(args.tokenizer):
      raise DataError(f"--tokenizer {args.tokenizer!r} not found; pass a tokenizer.json file.")
    files = [f for p in args.inputs for f in resolve_paths(p)]
    index = write_store(files, Tokenizer.from_file(args.tokenizer), args.out, field=args.text_field,
                        heldout_fraction=args.heldout_fraction, shard_mb=args.shard_mb, workers=args.workers)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = {s: sum(x["num_tokens"] for x in index["splits"][s]) for s in SPLITS}
  print(f"wrote {args.out}: {n['train']} train and {n['heldout']} held-out tokens ({index['dtype']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
