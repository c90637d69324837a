"""Adapter from the Pallas kernels (`pallas_kernels`, jax only) to the op API's backend registry.

Registers backend "pallas" once the kernels exist.
"""
