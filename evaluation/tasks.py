"""Synthetic retrieval tasks, generated on the fly from a seed (no downloads).

Every generator returns a `TaskBatch` of next-token-prediction arrays:

    tokens  [B, T] int32   what the model reads
    targets [B, T] int32   the token that follows each position (tokens shifted left by one)
    mask    [B, T] bool    True only where the target is an answer token (the positions that are scored)

so that a model's logits `[B, T, vocab]` are scored by `evaluation.metrics.masked_metrics(logits, targets, mask)`.

Tasks (docs/algorithm.md section 9):
- MQAR (Zoology's multi-query associative recall): `num_pairs` key-value pairs, then every key queried once at a
  power-law distributed distance; keys come from one half of the vocabulary, values from the other.
- RULER-style needles over a word vocabulary (`WordVocab`, or any tokenizer with `encode(str) -> list[int]`):
  S-NIAH-1 (repeated filler sentence, 7-digit number), S-NIAH-2 (essay-like filler, number), S-NIAH-3 (essay-like
  filler, UUID), MK-NIAH-1 (4 needles with different keys in essay-like filler, one of them queried).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Protocol, Sequence

import numpy as np

FILLER_TOKEN = 0  # MQAR: the token that fills the query region before it is randomised (Zoology's "0")


@dataclasses.dataclass(frozen=True)
class TaskBatch:
  """Next-token arrays of one task: `tokens`, `targets` `[B, T]` int32 and the scored positions `mask` `[B, T]`."""

  tokens: np.ndarray
  targets: np.ndarray
  mask: np.ndarray

  def __post_init__(self):
    for name in ("tokens", "targets", "mask"):
      x = getattr(self, name)
      if x.ndim != 2 or x.shape != self.tokens.shape:
        raise ValueError(f"`{name}` has shape {x.shape}; expected [B, T] = {self.tokens.shape}.")

  @property
  def shape(self) -> tuple[int, int]:
    return self.tokens.shape


def _from_sequences(seqs: np.ndarray, answer: np.ndarray) -> TaskBatch:
  """`seqs [B, T+1]` full sequences and `answer [B, T+1]` bool (answer tokens) -> shifted next-token arrays."""
  return TaskBatch(tokens=seqs[:, :-1].astype(np.int32), targets=seqs[:, 1:].astype(np.int32),
                   mask=answer[:, 1:].astype(bool))


def _sample_distinct(rng: np.random.Generator, batch: int, low: int, high: int, n: int) -> np.ndarray:
  """`[batch, n]` integers in [low, high), distinct within each row."""
  if n > high - low:
    raise ValueError(f"cannot draw {n} distinct tokens from [{low}, {high}): the vocabulary is too small.")
  # The n smallest of a row of uniforms is a uniform n-subset, in random order once shuffled by argsort.
  u = rng.random((batch, high - low))
  idx = np.argpartition(u, n - 1, axis=1)[:, :n]
  order = np.argsort(np.take_along_axis(u, idx, axis=1), axis=1)
  return low + np.take_along_axis(idx, order, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# MQAR


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Zoology's MQAR: `seq_len` input tokens holding `num_pairs` key-value pairs and then `num_pairs` queries.

  Keys come from [1, vocab_size // 2), values from [vocab_size // 2, vocab_size), both distinct within a sequence.
  Query slot j (of (seq_len - 2 * num_pairs) // 2 slots) is chosen with probability proportional to
  `power_a * j ** (power_a - 1)`, so most queries sit close to the context (Zoology's power law). The unused
  positions of the query region get random tokens (`random_filler`), so the model cannot find queries by position.
  """

  seq_len: int = 256
  num_pairs: int = 16
  vocab_size: int = 8192
  power_a: float = 0.01
  random_filler: bool = True

  def __post_init__(self):
    if self.seq_len < 4 * self.num_pairs:
      raise ValueError(f"MQAR `seq_len` is {self.seq_len}; expected >= 4 * num_pairs = {4 * self.num_pairs} "
                       f"(context of 2 * num_pairs tokens plus as many query slots).")
    if self.num_pairs < 1:
      raise ValueError(f"MQAR `num_pairs` is {self.num_pairs}; expected >= 1.")
    if self.vocab_size // 2 - 1 < self.num_pairs:
      raise ValueError(f"MQAR `vocab_size` {self.vocab_size} is too small for {self.num_pairs} distinct keys.")


def mqar(cfg: MQARConfig, batch_size: int, seed: int) -> TaskBatch:
  """A batch of MQAR sequences: `tokens, targets, mask [B, T]` with T = `cfg.seq_len`, B = `batch_size`.

  `mask` is True exactly at the query keys (whose next token is the value to recall): `num_pairs` per row.
  """
  rng = np.random.default_rng(seed)
  B, n, T = batch_size, cfg.num_pairs, cfg.seq_len
  half = cfg.vocab_size // 2
  keys = _sample_distinct(rng, B, 1, half, n)
  values = _sample_distinct(rng, B, half, cfg.vocab_size, n)
  context = np.stack([keys, values], axis=2).reshape(B, 2 * n)

  slots = (T - 2 * n) // 2
  p = cfg.power_a * np.arange(1, slots + 1, dtype=np.float64) ** (cfg.power_a - 1)
  p /= p.sum()
  # n distinct slots per row drawn with probabilities p (Gumbel top-n: sampling without replacement).
  gumbel = np.log(p)[None, :] - np.log(-np.log(rng.random((B, slots))))
  gaps = np.argpartition(-gumbel, n - 1, axis=1)[:, :n]
  # Each key is queried once; gaps in random order pair key i with a random slot.
  query = np.full((B, T + 1 - 2 * n), FILLER_TOKEN, np.int64)
  answer = np.zeros((B, T + 1), bool)
  rows = np.arange(B)[:, None]
  query[rows, 2 * gaps] = keys
  query[rows, 2 * gaps + 1] = values
  answer[rows, 2 * n + 2 * gaps + 1] = True
  seqs = np.concatenate([context, query], axis=1)
  if cfg.random_filler:
    filler = np.zeros_like(answer)
    filler[:, 2 * n:] = True
    filler[rows, 2 * n + 2 * gaps] = False
    filler[rows, 2 * n + 2 * gaps + 1] = False
    seqs = np.where(filler, rng.integers(0, cfg.vocab_size, seqs.shape), seqs)
  return _from_sequences(seqs, answer)


def mqar_mixture(configs: Sequence[MQARConfig], batch_size: int, seed: int, pad_to: Optional[int] = None) -> TaskBatch:
  """A training batch mixing MQAR settings (Zoology's train mix): row i uses `configs[i % len(configs)]`.

  Shorter sequences are right-padded to `pad_to` (default: the longest) with unscored `FILLER_TOKEN`s; a causal
  model never sees the padding from a scored position.
  """
  T = pad_to or max(c.seq_len for c in configs)
  if any(c.seq_len > T for c in configs):
    raise ValueError(f"`pad_to` is {T}; expected >= every seq_len {[c.seq_len for c in configs]}.")
  tokens = np.full((batch_size, T), FILLER_TOKEN, np.int32)
  targets = np.full((batch_size, T), FILLER_TOKEN, np.int32)
  mask = np.zeros((batch_size, T), bool)
  rng = np.random.default_rng(seed)
  for i, c in enumerate(configs):
    rows = np.arange(i, batch_size, len(configs))
    if len(rows) == 0:
      continue
    part = mqar(c, len(rows), int(rng.integers(2**31)))
    tokens[rows, :c.seq_len] = part.tokens
    targets[rows, :c.seq_len] = part.targets
    mask[rows, :c.seq_len] = part.mask
  return TaskBatch(tokens, targets, mask)


# ----------------------------------------------------------------------------------------------------------------
# RULER-style needle in a haystack


class Tokenizer(Protocol):
  """What the needle tasks need of a tokenizer: `encode(text) -> list[int]` and `vocab_size`."""

  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...


_FILLER_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ESSAY_WORDS = (
    "the a of to and in that it is was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after words called just where most know "
    "startup founders idea work company money investors product users build growth hard think good new years "
    "thing things great problem problems market want best early ideas write essay reason why often mistake "
    "school programmers language software computer design world small large fast slow always never usually "
    "probably surprising important simple ambitious wealth risk curious learn school city cities"
).split()
_KEY_ADJECTIVES = (
    "ancient bitter brave calm clever cold curious damp eager empty fancy fierce gentle golden hollow humble icy "
    "jolly kind lazy lively lucky mellow misty noisy odd pale proud quiet rapid rough rusty shiny silent silky sleepy "
    "smooth sour spicy steady sticky stormy sunny swift tame tender tiny vivid warm wild witty young"
).split()
_KEY_NOUNS = (
    "anchor apple arrow badge basket beacon bell blanket bottle bridge bucket button candle canyon castle cedar "
    "chimney cloud comet compass crystal desert dolphin dragon drum eagle ember falcon feather forest fountain garden "
    "glacier harbor helmet island jacket kettle ladder lantern lemon meadow mirror needle ocean orchard otter paddle "
    "pebble pepper pillow planet pocket puzzle quartz rabbit river saddle shadow shell spoon temple thunder tiger "
    "tower trumpet tunnel valley violin wagon whistle willow window"
).split()
_TEMPLATE = ("one of the special magic number numbers uuid uuids for is what mentioned in provided text").split()
_PUNCT = list(".,:?-")
_HEX = list("0123456789abcdef")
_UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class WordVocab:
  """A small word-level vocabulary that covers every needle-task text exactly (no unknown words).

  Ids: 0 `<pad>`, 1 `<bos>`, 2 `<unk>`, then punctuation, hex digits (0-9 doubles as the decimal digits), and the
  words of the templates, filler and keys. Numbers and UUIDs are spelled one character per token.
  """

  def __init__(self):
    words = ["<pad>", "<bos>", "<unk>"] + _PUNCT + _HEX
    for w in (_TEMPLATE + _FILLER_SENTENCE.lower().replace(".", "").split() + _ESSAY_WORDS + _KEY_ADJECTIVES
              + _KEY_NOUNS):
      if w not in words:
        words.append(w)
    self.words = tuple(words)
    self.index = {w: i for i, w in enumerate(words)}
    self.vocab_size = len(words)
    self.bos_id = 1

  def split(self, text: str) -> list[str]:
    out = []
    # A UUID is spelled one character per token (its hex runs could otherwise read as words, "be" or "a").
    for uuid, piece in re.findall(r"(" + _UUID_RE + r")|([A-Za-z]+|[0-9]|[^\sA-Za-z0-9])", text):
      out.extend(uuid.lower()) if uuid else out.append(piece.lower())
    return out

  def encode(self, text: str) -> list[int]:
    return [self.index.get(p, 2) for p in self.split(text)]

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[int(i)] for i in ids)


WORD_VOCAB = WordVocab()

NIAH_TASKS = ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah_1")


@dataclasses.dataclass(frozen=True)
class NIAHConfig:
  """One RULER-style needle task.

  task: 's_niah_1' (repeated filler sentence, number), 's_niah_2' (essay-like filler, number), 's_niah_3'
    (essay-like filler, UUID), 'mk_niah_1' (essay-like filler, number; `num_keys` needles, one queried).
  seq_len: input tokens T (prompt, question and all but the last answer token; the answer ends the sequence).
  depth: where the queried needle sits, as a fraction of the haystack (0 = start, 1 = end); None spreads the
    depths of a batch evenly over [0, 1] (row i at (i + 0.5) / B).
  """

  task: str = "s_niah_1"
  seq_len: int = 1024
  depth: Optional[float] = None
  num_keys: Optional[int] = None  # default 1, or 4 for mk_niah_1

  def __post_init__(self):
    if self.task not in NIAH_TASKS:
      raise ValueError(f"NIAH `task` is {self.task!r}; expected one of {NIAH_TASKS}.")
    if self.depth is not None and not 0.0 <= self.depth <= 1.0:
      raise ValueError(f"NIAH `depth` is {self.depth}; expected a fraction in [0, 1] or None.")

  @property
  def keys(self) -> int:
    if self.num_keys is not None:
      return self.num_keys
    return 4 if self.task == "mk_niah_1" else 1

  @property
  def uuid_value(self) -> bool:
    return self.task == "s_niah_3"

  @property
  def essay_filler(self) -> bool:
    return self.task != "s_niah_1"


def _essay_sentence(rng: np.random.Generator) -> str:
  n = int(rng.integers(6, 17))
  words = [str(w) for w in rng.choice(_ESSAY_WORDS, n)]
  if n > 9:
    words[int(rng.integers(3, n - 3))] += ","
  return " ".join(words).capitalize() + "."


def _value(rng: np.random.Generator, uuid: bool) -> str:
  if uuid:
    h = "".join(rng.choice(_HEX, 32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
  return str(int(rng.integers(1_000_000, 10_000_000)))


def _key(rng: np.random.Generator) -> str:
  return f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}"


def niah_example(cfg: NIAHConfig, rng: np.random.Generator, depth: float,
                 tokenizer: Tokenizer = WORD_VOCAB) -> tuple[list[int], int]:
  """One needle sequence of `cfg.seq_len + 1` token ids (the last answer token included) and its answer length.

  Layout: [bos] haystack-with-needles question answer. The haystack is cut at a token so the total length is exact.
  """
  kind = "uuids" if cfg.uuid_value else "numbers"
  keys: list[str] = []
  while len(keys) < cfg.keys:
    k = _key(rng)
    if k not in keys:
      keys.append(k)
  values = [_value(rng, cfg.uuid_value) for _ in keys]
  needles = [tokenizer.encode(f" One of the special magic {kind} for {k} is: {v}.") for k, v in zip(keys, values)]
  question = tokenizer.encode(f" What is the special magic {kind[:-1]} for {keys[0]} mentioned in the provided text? "
                              f"The special magic {kind[:-1]} for {keys[0]} mentioned in the provided text is:")
  answer = tokenizer.encode(f" {values[0]}")
  bos = [getattr(tokenizer, "bos_id", None)] if getattr(tokenizer, "bos_id", None) is not None else []
  budget = cfg.seq_len + 1 - len(bos) - sum(map(len, needles)) - len(question) - len(answer)
  if budget < 0:
    raise ValueError(f"NIAH `seq_len` {cfg.seq_len} is too short for {cfg.keys} needle(s), the question and the "
                     f"answer ({cfg.seq_len + 1 - budget} tokens).")
  # Haystack sentences, encoded one by one so the budget is met in tokens of this tokenizer.
  sentences: list[list[int]] = []
  used = 0
  filler_parts = _FILLER_SENTENCE.split(". ")
  while used < budget:
    if cfg.essay_filler:
      s = _essay_sentence(rng)
    else:
      s = filler_parts[len(sentences) % len(filler_parts)].rstrip(".") + "."
    ids = tokenizer.encode(" " + s)
    sentences.append(ids[:budget - used])
    used += len(sentences[-1])
  # Needles go between sentences: the queried one at `depth`, distractors at random other boundaries.
  bounds = len(sentences) + 1
  at = [int(round(depth * (bounds - 1)))]
  others = [b for b in range(bounds) if b != at[0]] or [at[0]]
  at += [int(x) for x in rng.choice(others, len(needles) - 1, replace=len(others) < len(needles) - 1)]
  inserts: dict[int, list[list[int]]] = {}
  for pos, ids in zip(at, needles):
    inserts.setdefault(pos, []).append(ids)
  seq = list(bos)
  for i in range(bounds):
    for ids in inserts.get(i, []):
      seq += ids
    if i < len(sentences):
      seq += sentences[i]
  seq += question + answer
  assert len(seq) == cfg.seq_len + 1, (len(seq), cfg.seq_len + 1)
  return seq, len(answer)


def niah(cfg: NIAHConfig, batch_size: int, seed: int, tokenizer: Tokenizer = WORD_VOCAB) -> TaskBatch:
  """A batch of needle sequences: `tokens, targets, mask [B, T]`; `mask` marks the answer tokens (the last ones)."""
  rng = np.random.default_rng(seed)
  seqs = np.zeros((batch_size, cfg.seq_len + 1), np.int64)
  answer = np.zeros((batch_size, cfg.seq_len + 1), bool)
  for i in range(batch_size):
    depth = cfg.depth if cfg.depth is not None else (i + 0.5) / batch_size
    ids, n_answer = niah_example(cfg, rng, depth, tokenizer)
    seqs[i] = ids
    answer[i, -n_answer:] = True
  return _from_sequences(seqs, answer)


def make_batch(task: str, *, seq_len: int, batch_size: int, seed: int, num_pairs: int = 16, vocab_size: int = 8192,
               depth: Optional[float] = None, tokenizer: Tokenizer = WORD_VOCAB) -> TaskBatch:
  """One entry point over every task name: 'mqar' or one of `NIAH_TASKS`."""
  if task == "mqar":
    return mqar(MQARConfig(seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size), batch_size, seed)
  return niah(NIAHConfig(task=task, seq_len=seq_len, depth=depth), batch_size, seed, tokenizer)
