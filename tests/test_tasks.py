"""Task generators: correct labels, correct scored positions, exact lengths, determinism with a seed."""

import numpy as np
import pytest

from evaluation import tasks
from evaluation.tasks import MQARConfig, NIAHConfig, WORD_VOCAB


def _check_shift(b: tasks.TaskBatch):
  # targets are the tokens shifted left by one: next-token prediction.
  np.testing.assert_array_equal(b.tokens[:, 1:], b.targets[:, :-1])


@pytest.mark.parametrize("T,n", [(64, 4), (128, 8), (256, 64), (1024, 256)])
def test_mqar_labels_and_mask(T, n):
  cfg = MQARConfig(seq_len=T, num_pairs=n, vocab_size=8192)
  b = tasks.mqar(cfg, 8, seed=T + n)
  assert b.shape == (8, T) and b.tokens.dtype == np.int32
  _check_shift(b)
  np.testing.assert_array_equal(b.mask.sum(1), n)  # every key queried exactly once
  half = cfg.vocab_size // 2
  for row in range(8):
    ctx = b.tokens[row, :2 * n]
    keys, values = ctx[0::2], ctx[1::2]
    assert np.all((keys >= 1) & (keys < half)) and len(set(keys)) == n
    assert np.all(values >= half) and len(set(values)) == n
    lookup = dict(zip(keys, values))
    pos = np.flatnonzero(b.mask[row])
    assert np.all(pos >= 2 * n)  # scored positions are in the query region, never in the context
    q = b.tokens[row, pos]
    assert sorted(q) == sorted(keys)
    np.testing.assert_array_equal(b.targets[row, pos], [lookup[k] for k in q])


def test_mqar_power_law_prefers_near_queries():
  b = tasks.mqar(MQARConfig(seq_len=1024, num_pairs=8), 64, seed=3)
  pos = np.flatnonzero(b.mask.reshape(-1)) % 1024 - 16
  assert np.median(pos) < (1024 - 16) / 4  # Zoology's power law puts most queries early in the query region


def test_mqar_deterministic_and_seeded():
  cfg = MQARConfig(seq_len=128, num_pairs=8)
  a, b, c = tasks.mqar(cfg, 4, 7), tasks.mqar(cfg, 4, 7), tasks.mqar(cfg, 4, 8)
  for name in ("tokens", "targets", "mask"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert not np.array_equal(a.tokens, c.tokens)


def test_mqar_rejects_impossible_config():
  with pytest.raises(ValueError, match="seq_len"):
    MQARConfig(seq_len=60, num_pairs=16)


def test_mqar_mixture_pads_unscored():
  cfgs = [MQARConfig(64, 4), MQARConfig(256, 32)]
  b = tasks.mqar_mixture(cfgs, 6, seed=1)
  assert b.shape == (6, 256)
  np.testing.assert_array_equal(b.mask.sum(1), [4, 32] * 3)
  assert not b.mask[0::2, 64:].any() and np.all(b.tokens[0::2, 64:] == tasks.FILLER_TOKEN)


def _find(hay: np.ndarray, needle: np.ndarray) -> list[int]:
  n = len(needle)
  return [i for i in range(len(hay) - n + 1) if np.array_equal(hay[i:i + n], needle)]


@pytest.mark.parametrize("task", tasks.NIAH_TASKS)
def test_niah_answer_is_in_the_needle(task):
  T, B = 384, 4
  b = tasks.niah(NIAHConfig(task=task, seq_len=T), B, seed=11)
  assert b.shape == (B, T)
  _check_shift(b)
  for row in range(B):
    pos = np.flatnonzero(b.mask[row])
    answer = b.targets[row, pos]
    # The scored positions are the last ones: the answer ends the sequence.
    np.testing.assert_array_equal(pos, np.arange(T - len(pos), T))
    expect = 36 if task == "s_niah_3" else 7
    assert len(answer) == expect
    text = WORD_VOCAB.decode(answer).replace(" ", "")
    if task == "s_niah_3":
      assert [len(p) for p in text.split("-")] == [8, 4, 4, 4, 12]
    else:
      assert text.isdigit()
    # The value appears once, inside the queried needle, right after "<key> is :".
    hits = _find(b.tokens[row, :T - len(pos)], answer)
    assert len(hits) == 1
    question = WORD_VOCAB.decode(b.tokens[row, T - len(pos) - 30:T - len(pos) + 1])
    key = question.split(" for ")[-1].split(" mentioned")[0]
    needle = np.array(WORD_VOCAB.encode(f"for {key} is:"))
    assert hits[0] - len(needle) in _find(b.tokens[row], needle)


def test_mk_niah_has_distinct_distractors():
  b = tasks.niah(NIAHConfig(task="mk_niah_1", seq_len=512), 3, seed=2)
  intro = np.array(WORD_VOCAB.encode("One of the special magic numbers for"))
  for row in range(3):
    starts = _find(b.tokens[row], intro)
    assert len(starts) == 4
    keys = {tuple(b.tokens[row, s + len(intro):s + len(intro) + 3]) for s in starts}
    assert len(keys) == 4


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_depth(depth):
  T = 512
  b = tasks.niah(NIAHConfig(task="s_niah_2", seq_len=T, depth=depth), 2, seed=5)
  intro = np.array(WORD_VOCAB.encode("One of the special magic numbers for"))
  for row in range(2):
    (start,) = _find(b.tokens[row], intro)
    frac = start / T
    assert abs(frac - depth * 0.9) < 0.15  # the question takes the last ~10% of the sequence


def test_niah_deterministic_and_other_tokenizer():
  cfg = NIAHConfig(task="s_niah_1", seq_len=200)
  a, b = tasks.niah(cfg, 2, 9), tasks.niah(cfg, 2, 9)
  np.testing.assert_array_equal(a.tokens, b.tokens)

  class Chars:  # any tokenizer with encode() works; lengths are met in its own tokens
    vocab_size = 128

    def encode(self, text):
      return [ord(c) % 128 for c in text]

  c = tasks.niah(NIAHConfig(task="s_niah_1", seq_len=400), 2, 9, tokenizer=Chars())
  assert c.shape == (2, 400)
  assert "".join(chr(t) for t in c.targets[0][c.mask[0]]).strip().isdigit()


def test_word_vocab_round_trip_and_uuid_spelling():
  ids = WORD_VOCAB.encode("The sky is blue. 3fa9bd12-be00-1234-abcd-0123456789ab")
  assert 2 not in ids  # no unknown word
  assert WORD_VOCAB.decode(ids).split()[:5] == ["the", "sky", "is", "blue", "."]
  assert len(ids) == 5 + 36


def test_make_batch_dispatch():
  assert tasks.make_batch("mqar", seq_len=64, batch_size=2, seed=0, num_pairs=4).mask.sum() == 8
  assert tasks.make_batch("s_niah_3", seq_len=128, batch_size=2, seed=0).mask.sum() == 72
  with pytest.raises(ValueError, match="task"):
    tasks.make_batch("nope", seq_len=64, batch_size=1, seed=0)
