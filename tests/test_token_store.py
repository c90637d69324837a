"""Token stores: the streaming writer (every document once, per split), memory-mapped windows, flat memory."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train import data, token_store
from train.config import DataConfig
from train.testing import write_corpus


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Two JSONL files and a plain-text file, and a BPE trained on them: `(directory, tokenizer)`."""
  d = tmp_path_factory.mktemp("sources")
  write_corpus(str(d / "a.jsonl"), n_docs=150, seed=11)
  write_corpus(str(d / "b.jsonl"), n_docs=90, seed=12)
  (d / "c.txt").write_text("a plain text file is one document\nof two lines.\n")
  docs, _ = data.read_documents(DataConfig(path=str(d), max_corpus_mb=100))
  return str(d), data.train_bpe(docs, 300)


def _split_docs(store, split, tokenizer):
  """The decoded documents of one split (each must end in EOS) and the split's stream and document starts."""
  index = token_store.read_index(store)
  tokens, starts, base = [], [], 0
  for s in index["splits"][split]:
    t = np.fromfile(os.path.join(store, split, f"{s['name']}.tokens"), index["dtype"])
    starts.append(np.fromfile(os.path.join(store, split, f"{s['name']}.docs"), "<u8").astype(np.int64) + base)
    tokens.append(t)
    base += len(t)
  stream, starts = np.concatenate(tokens).astype(np.int32), np.concatenate(starts)
  eos = data.eos_id(tokenizer)
  out = []
  for a, b in zip(starts, list(starts[1:]) + [len(stream)]):
    assert stream[b - 1] == eos
    out.append(tokenizer.decode(stream[a:b - 1].tolist()))
  return out, stream, starts


def test_every_document_goes_once_to_its_split(sources, tmp_path):
  d, tok = sources
  files = data.resolve_paths(d)
  # 4 KiB input shards: each JSONL file is cut into several byte ranges (lines across a cut stay whole).
  plan = token_store.plan_shards(files, shard_mb=4 / 1024)
  assert len(plan) > 6 and sum(p.path.endswith("a.jsonl") for p in plan) > 2
  index = token_store.write_store(files, tok, str(tmp_path / "s"), heldout_fraction=0.2, shard_mb=4 / 1024)
  assert index["dtype"] == "uint16" and index["vocab_size"] == 300
  docs, _ = data.read_documents(DataConfig(path=d, max_corpus_mb=100))
  train_docs, held_docs = data.split_heldout(docs, 0.2)
  got_train, _, _ = _split_docs(str(tmp_path / "s"), "train", tok)
  got_held, _, _ = _split_docs(str(tmp_path / "s"), "heldout", tok)
  assert sorted(got_train) == sorted(train_docs) and sorted(got_held) == sorted(held_docs)
  assert len(got_train) + len(got_held) == 241


def test_windows_are_the_packed_stream_across_shards(sources, tmp_path):
  d, tok = sources
  store = str(tmp_path / "s")
  token_store.write_store(data.resolve_paths(d), tok, store, shard_mb=4 / 1024)
  _, stream, starts = _split_docs(store, "train", tok)
  T = 24
  got = token_store.StoreSequences(store, "train", T)
  want = data.PackedSequences(data.TokenShard(stream, starts), T)
  assert len(got) == len(want) and got.num_tokens == len(stream) and len(got.tokens) > 6
  for i in range(len(want)):  # every window, many of them across a shard boundary
    a, b = got[i], want[i]
    for k in b:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"window {i} {k}")
      assert a[k].dtype == b[k].dtype
  np.testing.assert_array_equal(got.head(100), stream[:100])


def test_an_interrupted_write_resumes_and_worker_processes_agree(sources, tmp_path):
  d, tok = sources
  files = data.resolve_paths(d)
  one = str(tmp_path / "one")
  token_store.write_store(files, tok, one, heldout_fraction=0.1, shard_mb=16 / 1024)
  # Interrupted after some shards: no index, two shards never written.
  two = str(tmp_path / "two")
  plan = token_store.plan_shards(files, shard_mb=16 / 1024)
  kept = plan[:-2]
  for s in kept:
    token_store.tokenize_shard(s, tok.to_str(), two, "text", 0.1, 300)
  marker = os.path.join(two, "shards", f"{kept[0].name}.json")
  before = os.stat(marker).st_mtime_ns
  index = token_store.write_store(files, tok, two, heldout_fraction=0.1, shard_mb=16 / 1024, workers=2)
  assert os.stat(marker).st_mtime_ns == before  # a finished shard is not tokenised again
  assert index == token_store.read_index(one)
  with pytest.raises(data.DataError, match="written with another tokenizer"):
    token_store.write_store(files, data.train_bpe(["other text"] * 20, 280), two)
  for split in ("train", "heldout"):
    for s in index["splits"][split]:
      for kind in ("tokens", "docs"):
        name = os.path.join(split, f"{s['name']}.{kind}")
        with open(os.path.join(one, name), "rb") as f, open(os.path.join(two, name), "rb") as g:
          assert f.read() == g.read(), name


def test_streaming_corpus_feeds_the_grain_pipeline(sources, tmp_path):
  d, tok = sources
  cfg = DataConfig(path=d, vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache"), heldout_fraction=0.1,
                   streaming=True, tokenize_workers=1, shard_mb=8 / 1024)
  c = data.build_corpus(cfg)
  assert isinstance(c.train, token_store.StoreSequences) and c.heldout is not None and c.vocab_size == 300
  # The store is written once: a second build opens it; data.path may also name the store itself.
  store = os.path.join(cfg.cache_dir, c.fingerprint)
  stamp = os.stat(os.path.join(store, "index.json")).st_mtime_ns
  again = data.build_corpus(cfg)
  assert os.stat(os.path.join(store, "index.json")).st_mtime_ns == stamp and again.fingerprint == c.fingerprint
  direct = data.build_corpus(dataclasses.replace(cfg, path=store, streaming=False, cache_dir=str(tmp_path / "x")))
  assert direct.tokenizer.to_str() == c.tokenizer.to_str() and direct.train.num_tokens == c.train.num_tokens
  it = iter(data.make_train_dataset(c.train, batch_per_process=4, seed=0, shuffle=True))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  restored = iter(data.make_train_dataset(c.train, batch_per_process=4, seed=0, shuffle=True))
  restored.set_state(json.loads(json.dumps(state)))
  for x in expected:
    y = next(restored)
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
  # Each process reads its own windows only.
  shares = [{row.tobytes() for _ in range(4) for row in next(p)["tokens"]} for p in (
      iter(data.make_train_dataset(c.train, batch_per_process=2, seed=0, shuffle=True, process_index=i,
                                   process_count=2)) for i in range(2))]
  assert len(shares[0]) == len(shares[1]) == 8 and not shares[0] & shares[1]


@pytest.mark.parametrize("lines, expected", [
    ('{"text": "ok"}\nnot json\n', "at byte 15 is not valid JSON"),
    ('{"body": "x"}\n', "has no field 'text'"),
])
def test_bad_rows_are_one_line_with_the_byte_offset(sources, tmp_path, lines, expected):
  _, tok = sources
  (tmp_path / "bad.jsonl").write_text(lines)
  with pytest.raises(data.DataError) as e:
    token_store.write_store([str(tmp_path / "bad.jsonl")], tok, str(tmp_path / "s"))
  assert expected in str(e.value) and "\n" not in str(e.value)


def _jsonl_to_parquet(src: str, dst: str, row_group_size: int) -> list[str]:
  """The rows of a JSONL corpus as a Parquet file of `row_group_size`-row groups, with an id and a null row too."""
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa
  rows = [json.loads(line) for line in open(src)]
  texts = [r["text"] for r in rows] + [None, "   "]  # a null and a blank row: skipped
  pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), dst, row_group_size=row_group_size)
  return [r["text"] for r in rows]


def test_parquet_shards_by_row_groups_and_reads_every_document_once(sources, tmp_path):
  # A Parquet corpus (the paper-scale sets ship as Parquet) is cut into runs of row groups, so its shards tokenise
  # in parallel like a JSONL file's byte ranges; the store holds each of its documents once, as from the JSONL.
  d, tok = sources
  texts = _jsonl_to_parquet(os.path.join(d, "a.jsonl"), str(tmp_path / "a.parquet"), row_group_size=20)
  plan = token_store.plan_shards([str(tmp_path / "a.parquet")], shard_mb=4 / 1024)
  assert len(plan) > 2 and plan[0].start == 0 and plan[-1].end == 8  # 152 rows in 8 groups, every group once
  assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
  token_store.write_store([str(tmp_path / "a.parquet")], tok, str(tmp_path / "s"), heldout_fraction=0.2,
                          shard_mb=4 / 1024)
  got = _split_docs(str(tmp_path / "s"), "train", tok)[0] + _split_docs(str(tmp_path / "s"), "heldout", tok)[0]
  assert sorted(got) == sorted(texts)
  docs, _ = data.read_documents(DataConfig(path=str(tmp_path / "a.parquet"), max_corpus_mb=100))
  assert sorted(docs) == sorted(texts)


def test_bad_parquet_is_one_line(sources, tmp_path):
  _, tok = sources
  _jsonl_to_parquet(os.path.join(sources[0], "b.jsonl"), str(tmp_path / "b.parquet"), row_group_size=50)
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
  for path, expected in ((tmp_path / "b.parquet", "has no column 'body'"),
                         (tmp_path / "broken.parquet", "is not a readable Parquet file")):
    with pytest.raises(data.DataError) as e:
      token_store.write_store([str(path)], tok, str(tmp_path / "s"), field="body")
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- memory -----------------------------------------------------------------------------------------------------


def _memory_mb() -> dict:
  """This process's resident memory in MiB: all of it (VmRSS), private (RssAnon) and file pages mapped (RssFile)."""
  with open("/proc/self/status") as f:
    return {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in f)
            if k in ("VmRSS", "RssAnon", "RssFile")}


def _random_store(path: str, total_mb: int, shards: int = 4) -> int:
  """A store of `total_mb` MiB of random uint16 tokens in `shards` shards (documents of 1 to 4000 tokens)."""
  rng = np.random.default_rng(0)
  per = total_mb * 2**20 // 2 // shards
  recs = []
  for i in range(shards):
    tokens = rng.integers(1, 300, per, dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(rng.integers(1, 4000, per // 1000))])
    starts = starts[starts < per]
    tokens[starts[1:] - 1] = 0  # EOS before each document start
    recs.append(token_store.write_shard_arrays(path, "train", f"{i:05d}", tokens, starts))
    del tokens, starts
  token_store.write_index(path, {"format": token_store.FORMAT, "version": token_store.VERSION, "dtype": "uint16",
                                 "eos_id": 0, "vocab_size": 300, "splits": {"train": recs, "heldout": []}})
  return total_mb


@pytest.mark.parametrize("size_mb, batches", [
    (64, 100),
    pytest.param(384, 400, marks=pytest.mark.slow),
])
def test_reading_a_large_store_keeps_memory_flat(tmp_path, size_mb, batches):
  store = str(tmp_path / "big")
  _random_store(store, size_mb)
  warm = iter(data.make_train_dataset(data.PackedSequences(data.TokenShard(np.zeros(4096, np.int32), np.zeros(1,
              np.int64)), 2047), batch_per_process=1, seed=0, shuffle=True))
  next(warm)  # grain's import and threads are not the store's memory
  before = _memory_mb()
  src = token_store.StoreSequences(store, "train", 2047)
  it = iter(data.make_train_dataset(src, batch_per_process=8, seed=0, shuffle=True))
  for _ in range(batches):
    b = next(it)
  after = _memory_mb()
  assert b["tokens"].shape == (8, 2047) and src.num_tokens == size_mb * 2**19
  # Private memory: the batches in flight. Loading the store (or an int32 copy) would add size_mb or more. File
  # pages of the memory map are not counted: they are the kernel's page cache (shared, dropped under pressure), and
  # with the file cached the kernel maps the pages around each one touched, so VmRSS can count the whole file.
  grown = {k: round(after[k] - before[k], 1) for k in after}
  assert grown["RssAnon"] < 0.15 * size_mb, f"reading {batches} batches of a {size_mb} MB store grew memory by {grown}"


_WRITER = """
import resource, sys
from tokenizers import Tokenizer
from train import token_store
token_store.write_store([sys.argv[1]], Tokenizer.from_file(sys.argv[2]), sys.argv[3], heldout_fraction=0.01,
                        shard_mb=float(sys.argv[4]), workers=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _jsonl_of(path: str, mb: float) -> str:
  """A JSONL corpus of about `mb` MiB (written in pieces: the test's own memory stays small)."""
  words = np.array("the state decays every channel while erase gate reads keys write scales values".split())
  rng = np.random.default_rng(1)
  with open(path, "w") as f:
    written = i = 0
    while written < mb * 2**20:
      rows = [json.dumps({"text": f"doc {i + j}: " + " ".join(words[rng.integers(0, len(words), 60)])}) + "\n"
              for j in range(2000)]
      block = "".join(rows)
      f.write(block)
      written += len(block)
      i += 2000
  return path


@pytest.mark.parametrize("small_mb, large_mb", [
    (1, 4),
    pytest.param(64, 128, marks=pytest.mark.slow),
])
def test_tokenising_keeps_memory_flat_as_the_corpus_grows(sources, tmp_path, small_mb, large_mb):
  _, tok = sources
  tok_file = str(tmp_path / "tok.json")
  tok.save(tok_file)
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  peak = {}
  for mb in (small_mb, large_mb):
    src = _jsonl_of(str(tmp_path / f"c{mb}.jsonl"), mb)
    out = subprocess.run([sys.executable, "-c", _WRITER, src, tok_file, str(tmp_path / f"s{mb}"), str(large_mb)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak[mb] = float(out.stdout.split()[-1])
    os.remove(src)
  # One input shard each (shard_mb = the larger size): only the batch of documents being tokenised is in memory.
  assert peak[large_mb] < 1.1 * peak[small_mb], peak
