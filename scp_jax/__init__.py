"""scp-jax: vmapped Flax ensembles for single-cell perturbation prediction."""
