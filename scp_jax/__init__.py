"""scp-jax: vmapped Flax ensembles for single-cell perturbation prediction."""

import importlib.metadata
import os

# XLA:CPU's YNN fusions in jaxlib 0.10 miscompile the factorized model's batched prediction: predicting
# 255 query rows x 18,211 genes for 20 members, every Myeloid row got the B cells' size exp(s) (127 of
# 255 rows off by up to 30%; one row at a time, 4 members or 64 genes were right; jaxlib 0.12 is right).
# Training was unaffected (losses equal to 1e-6). They are turned off before jax starts its CPU
# backend, which costs the default recipe about a fifth of its CPU speed; a choice of the user's in
# XLA_FLAGS is left alone, and GPUs never use them. tests/test_models.py checks it at full size.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _jaxlib_version():
    """jaxlib's version, read without importing it (importing jax reads XLA_FLAGS); "" when not installed,
    which `import jax` then reports."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


_flags = os.environ.get("XLA_FLAGS", "")
if _jaxlib_version().startswith("0.10.") and "ynn_fusion_type" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {YNN_OFF}".strip()
