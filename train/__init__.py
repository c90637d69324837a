"""Training: configs, grain data, optax, orbax checkpoints, device meshes."""
