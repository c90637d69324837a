"""The grain text pipeline: reading, held-out split, tokenizer, pre-tokenised shards, packing, iterator state."""

import dataclasses
import json
import os

import numpy as np
import pytest

from train import data
from train.config import DataConfig
from train.testing import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("data")
  path = write_corpus(str(tmp / "c.jsonl"), n_docs=200, seed=1)
  cfg = DataConfig(path=path, vocab_size=300, seq_len=32, cache_dir=str(tmp / "cache"), heldout_fraction=0.1)
  return cfg, data.build_corpus(cfg)


def test_packing_windows_are_the_stream_with_segments(corpus):
  cfg, c = corpus
  src, T = c.train, cfg.seq_len
  stream = np.asarray(src.shard.tokens)
  starts = src.shard.doc_starts
  eos = data.eos_id(c.tokenizer)
  assert len(src) == stream.shape[0] // (T + 1)
  for i in (0, 1, len(src) // 2, len(src) - 1):
    ex = src[i]
    lo = i * (T + 1)
    np.testing.assert_array_equal(ex["tokens"], stream[lo:lo + T])
    np.testing.assert_array_equal(ex["targets"], stream[lo + 1:lo + T + 1])
    # Segment ids start at 1 and step by one exactly where a document starts.
    seg = ex["segment_ids"]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
    new_doc = np.isin(np.arange(lo + 1, lo + T), starts)
    np.testing.assert_array_equal(np.diff(seg) == 1, new_doc)
    # Tokens before a document start are EOS; targets across a boundary are masked out.
    before = np.nonzero(np.diff(seg) == 1)[0]
    assert np.all(ex["tokens"][before] == eos)
    np.testing.assert_array_equal(ex["loss_mask"][before], 0.0)
    assert ex["loss_mask"].sum() == T - np.isin(np.arange(lo + 1, lo + T + 1), starts).sum()


def test_every_document_is_tokenised_once_with_eos(corpus):
  cfg, c = corpus
  docs, _ = data.read_documents(cfg)
  train_docs, held = data.split_heldout(docs, cfg.heldout_fraction)
  assert len(train_docs) + len(held) == len(docs) and held and not set(train_docs) & set(held)
  starts = c.train.shard.doc_starts
  assert len(starts) == len(train_docs)
  stream = np.asarray(c.train.shard.tokens)
  decoded = set()
  for a, b in zip(starts, list(starts[1:]) + [stream.shape[0]]):
    assert stream[b - 1] == data.eos_id(c.tokenizer)
    decoded.add(c.tokenizer.decode(stream[a:b - 1].tolist()))
  assert decoded == set(train_docs)


def test_build_is_deterministic_and_cached(corpus, tmp_path):
  cfg, c = corpus
  again = data.build_corpus(cfg)  # from the cache
  fresh = data.build_corpus(dataclasses.replace(cfg, cache_dir=str(tmp_path / "other")))  # rebuilt
  for other in (again, fresh):
    np.testing.assert_array_equal(np.asarray(other.train.shard.tokens), np.asarray(c.train.shard.tokens))
  assert fresh.tokenizer.to_str() == c.tokenizer.to_str()


def test_given_tokenizer_file_is_used(corpus, tmp_path):
  cfg, c = corpus
  path = str(tmp_path / "tokenizer.json")
  c.tokenizer.save(path)
  got = data.build_corpus(dataclasses.replace(cfg, tokenizer=path, vocab_size=999, cache_dir=str(tmp_path / "c")))
  assert got.vocab_size == c.vocab_size
  np.testing.assert_array_equal(np.asarray(got.train.shard.tokens), np.asarray(c.train.shard.tokens))


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_order_determinism_and_checkpoint_restore(corpus):
  _, c = corpus
  make = lambda seed=0: iter(data.make_train_dataset(c.train, batch_per_process=4, seed=seed, shuffle=True))
  a, b = make(), make()
  first = _take(a, 3)
  for x, y in zip(first, _take(b, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(_take(make(seed=1), 1)[0]["tokens"], first[0]["tokens"])
  state = a.get_state()
  expected = _take(a, 4)
  restored = make()
  restored.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip (what orbax writes)
  for x, y in zip(expected, _take(restored, 4)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_epochs_cover_all_windows_and_reshuffle(corpus):
  _, c = corpus
  n = len(c.train)
  it = iter(data.make_train_dataset(c.train, batch_per_process=1, seed=0, shuffle=True))
  index = {c.train[i]["tokens"].tobytes(): i for i in range(n)}
  lo = lambda ex: index[ex["tokens"][0].tobytes()]
  epoch1 = [lo(next(it)) for _ in range(n)]
  epoch2 = [lo(next(it)) for _ in range(n)]
  assert sorted(epoch1) == list(range(n)) and sorted(epoch2) == list(range(n))
  assert epoch1 != epoch2


def test_processes_get_disjoint_shares(corpus):
  _, c = corpus
  seen = []
  for p in range(2):
    it = iter(data.make_train_dataset(c.train, batch_per_process=2, seed=0, shuffle=True, process_index=p,
                                      process_count=2))
    seen.append({tuple(row) for b in _take(it, 4) for row in b["tokens"]})
  assert len(seen[0]) == 8 and len(seen[1]) == 8 and not seen[0] & seen[1]


def test_plain_text_directory_and_embedded_default_sources(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n" * 20)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("# title\nsome text\n")
  (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
  docs, _ = data.read_documents(DataConfig(path=str(tmp_path)))
  assert sorted(docs) == sorted(["hello world\n" * 20, "# title\nsome text\n"])
  files = data.stdlib_files()
  assert len(files) > 100 and all(f.endswith(".py") and "site-packages" not in f for f in files)
  docs, _ = data.read_documents(DataConfig(path=None, max_corpus_mb=0.05))
  assert 0.05 * 2**20 <= sum(map(len, docs)) < 0.05 * 2**20 + max(map(len, docs)) + 1


@pytest.mark.parametrize("setup, expected", [
    (lambda t: DataConfig(path=str(t / "missing.jsonl")), "does not exist"),
    (lambda t: (t / "e.jsonl").write_text("\n\n") and DataConfig(path=str(t / "e.jsonl")), "is empty"),
    (lambda t: (t / "f.jsonl").write_text('{"body": "x"}\n') and DataConfig(path=str(t / "f.jsonl")),
     "has no field 'text'"),
    (lambda t: (t / "g.jsonl").write_text("not json\n") and DataConfig(path=str(t / "g.jsonl")), "not valid JSON"),
])
def test_bad_data_gives_one_line_errors(tmp_path, setup, expected):
  with pytest.raises(data.DataError) as e:
    data.read_documents(setup(tmp_path))
  assert expected in str(e.value) and "\n" not in str(e.value)
