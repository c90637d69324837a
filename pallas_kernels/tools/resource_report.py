"""Registers, spills and shared memory of each GDN-2 kernel for sm90, computed on a machine without a GPU.

JAX lowers each `pallas_call` to Triton IR (the GPU query is stubbed to compute capability 9.0). A pip-installed
`triton` (3.6, as on the lent H100; not a project dependency) compiles that IR to PTX, and its bundled `ptxas -v`
reports the resources. These are proxies only, but they found the register spills and the shared memory that kept
intra_bwd at one block per SM (see README.md). Time on the GPU stays the real measure.

  pip install --target /tmp/triton-site triton==3.6.0
  python -m pallas_kernels.tools.resource_report --triton /tmp/triton-site [--config '{"block_k": 16}']
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def lower_kernels(cfg_kw: dict, out_dir: str, shape=(8, 2048, 16, 128, 128)) -> list[str]:
  """Writes `<kernel>.ttir` for every kernel of the forward and backward at `shape` (B, T, H, K, V)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import lowering
  from jax._src.pallas.triton import pallas_call_registration as reg

  from pallas_kernels import ChunkConfig
  from pallas_kernels.tools.sm90 import lowering_for_sm90

  original = lowering.lower_jaxpr_to_triton_module
  names = []

  def capture(jaxpr, grid_mapping, platform, cc, mlir_ctx=None):
    res = original(jaxpr, grid_mapping, platform, cc, mlir_ctx=mlir_ctx)
    text = res.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt.func public @(\w+)", text).group(1)
    with open(os.path.join(out_dir, name + ".ttir"), "w") as f:
      f.write(text)
    names.append(name)
    return res

  reg.lowering.lower_jaxpr_to_triton_module = capture
  try:
    # Forward and backward through the public op, so every kernel is lowered with its real operands.
    from pallas_kernels import chunk_gdn2
    cfg = ChunkConfig(**cfg_kw)
    S = jax.ShapeDtypeStruct
    B, T, H, K, V = shape
    bf, f32 = jnp.bfloat16, jnp.float32
    args = [S((B, T, H, K), bf)] * 2 + [S((B, T, H, V), bf), S((B, T, H, K), f32), S((B, T, H, K), bf),
                                        S((B, T, H, V), bf), S((B, H, K, V), f32)]

    def loss(*a):
      o, s = chunk_gdn2(*a, scale=K ** -0.5, config=cfg)
      return jnp.sum(o.astype(f32)) + jnp.sum(s)

    with lowering_for_sm90():
      jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = original
  return names



def compile_report(triton_site: str, ttir: str, num_warps: int, num_stages: int) -> dict:
  """Compiles one `.ttir` for sm90 with triton from `triton_site`; returns registers, spills, stack, shared."""
  sys.path.insert(0, triton_site)
  import triton
  from triton.backends.compiler import GPUTarget
  k = triton.compile(ttir, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
  ptx = ttir[:-5] + ".ptx"
  with open(ptx, "w") as f:
    f.write(k.asm["ptx"])
  ptxas = os.path.join(triton_site, "triton", "backends", "nvidia", "bin", "ptxas")
  log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True).stderr
  num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None
  return {"registers": num(r"Used (\d+) registers"), "stack_bytes": num(r"(\d+) bytes stack frame"),
          "spill_store_bytes": num(r"(\d+) bytes spill stores"), "spill_load_bytes": num(r"(\d+) bytes spill loads"),
          "shared_bytes": k.metadata.shared}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--triton", required=True, help="folder holding a pip-installed triton (pip install --target)")
  ap.add_argument("--config", default="{}", help="ChunkConfig fields as JSON")
  ap.add_argument("--only", default="", help="comma-separated kernel names (e.g. gdn2_chunk_fwd) to compile")
  args = ap.parse_args()
  cfg_kw = json.loads(args.config)
  from pallas_kernels import ChunkConfig
  cfg = ChunkConfig(**cfg_kw)
  with tempfile.TemporaryDirectory() as d:
    for name in lower_kernels(cfg_kw, d):
      if args.only and name not in args.only.split(","):
        continue
      t = cfg.tiling(name[len("gdn2_"):])
      r = compile_report(args.triton, os.path.join(d, name + ".ttir"), t.num_warps, t.num_stages)
      per_sm = 233472 // (r["shared_bytes"] + 1024) if r["shared_bytes"] else None
      print(f"{name:18s} regs {r['registers']}  stack {r['stack_bytes']} B  spills {r['spill_store_bytes']}/"
            f"{r['spill_load_bytes']} B  shared {r['shared_bytes']} B (blocks/SM by shared memory: {per_sm})")


if __name__ == "__main__":
  main()
