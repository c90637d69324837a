"""Where the layers call the GDN-2 op, so that a device mesh can run it per shard.

`call_mixer_op(fn, *args, **kwargs)` is how every mixer invokes `gdn2_jax.gdn2` (or a family op). Outside a mesh it
is a plain call. The training code installs a mesh (see `train/`) so the op runs under `shard_map` over the batch
and head axes, never gathered onto one device.
"""

from __future__ import annotations


def call_mixer_op(fn, *args, **kwargs):
  return fn(*args, **kwargs)
