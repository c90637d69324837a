"""orbax checkpoints: exact round trip of state + grain iterator, keep-last-K, interrupted saves never loaded."""

import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import Checkpointer, flatten_state, unflatten_like


def _state(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"params": {"w": jax.random.normal(k1, (4, 3)), "norm": {"scale": jax.random.normal(k2, (3,))}},
          "opt": (jnp.asarray(seed, jnp.int32), [jax.random.normal(k2, (2,), jnp.bfloat16)]),
          "step": jnp.asarray(seed, jnp.int32)}


def _iterator():
  ds = grain.MapDataset.range(1000).shuffle(seed=3).batch(2)
  return iter(ds.to_iter_dataset())


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_flatten_round_trip():
  s = _state(1)
  flat = flatten_state(s)
  assert "params.norm.scale" in flat and "opt.1.0" in flat
  _assert_tree_equal(unflatten_like(s, flat), s)
  with pytest.raises(ValueError, match="lacks 1 arrays"):
    unflatten_like(s, {k: v for k, v in flat.items() if k != "step"})


def test_save_restore_is_exact_and_keeps_last_k(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "c"), every=2, keep=2, async_save=True)
  it = _iterator()
  saved = {}
  for step in range(1, 6):
    next(it)
    if ckpt.save(step, _state(step), it, force=step == 5):
      saved[step] = [next(_copy_iterator(it)) for _ in range(1)]
  ckpt.wait()
  assert ckpt.all_steps() == [4, 5]
  assert set(saved) == {2, 4, 5}
  fresh = _iterator()
  restored = ckpt.restore(4, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0)), fresh)
  _assert_tree_equal(restored, _state(4))
  np.testing.assert_array_equal(next(fresh), saved[4][0])  # the iterator continues where step 4 stopped
  ckpt.close()


def _copy_iterator(it):
  other = _iterator()
  other.set_state(it.get_state())
  return other


def test_interrupted_save_is_never_loaded(tmp_path):
  d = tmp_path / "c"
  ckpt = Checkpointer(str(d), every=1, keep=5, async_save=False)
  it = _iterator()
  for step in (1, 2):
    next(it)
    ckpt.save(step, _state(step), it)
  ckpt.close()
  # A run killed while writing step 3: orbax's temporary directory, complete-looking content, never renamed.
  shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp-1732000000000000")
  # ...and one killed while writing only part of its items.
  partial = d / "4.orbax-checkpoint-tmp-1732000000000001"
  shutil.copytree(d / "2" / "state", partial / "state")
  again = Checkpointer(str(d), every=1, keep=5)
  assert again.latest_step() == 2 and again.all_steps() == [1, 2]
  restored = again.restore(again.latest_step(), _state(0), _iterator())
  _assert_tree_equal(restored, _state(2))
  # The resumed run saves step 3 over the leftovers, and what is loaded back is that save, not the stale copy.
  assert again.save(3, _state(3), it, force=True)
  again.wait()
  assert again.all_steps() == [1, 2, 3]
  _assert_tree_equal(again.restore(3, _state(0), _iterator()), _state(3))
  again.close()
