"""`python -m scp_jax.export RUN_DIR --out model.npz [--best|--last] [--step N|best]`: an ensemble as plain numpy.

It reads the latest checkpoint, or `--step`: a kept step, or `best`, the kept step whose last-epoch
parameters scored best (with `--last`: the ensemble stopped at its best checkpoint).

The npz holds the parameters stacked over members under their model's names (an MLP's
`params.layers.<i>.kernel`, ..., `params.head.bias`; a factorized model's `params.cell.*`,
`params.compound.*`, `params.loadings.kernel`, `params.offset`, `params.log_cap`, with row sizes
`params.cell_log_scale` and `params.pair_log_scale`),
each member's best validation score and epoch (`members.best_score`; `members.best_epoch`, from 0, -1: none),
the feature tables (`features.cell`, `features.compound`, per fold slot `features.fold_cell`,
`features.fold_compound`), the SVD target decoder per fold slot (`decoder.mean`, `decoder.basis`)
when the run predicts components, each gene's training range
(`clip_min`, `clip_max`), `manifest`, a JSON string (architecture and its config, member table,
feature spec, vocabularies, gene names, package versions), and `sha256` over the manifest and the
arrays. scp_jax.predictor runs it without jax.
"""

import argparse
import importlib.metadata
import json
import tomllib
from pathlib import Path

import numpy as np

from scp_jax.atomic import atomic_path
from scp_jax.config import run_config_path
from scp_jax.errors import ArgumentParser, UserError, cli_main
from scp_jax.predictor import DIGEST, FORMAT, MANIFEST, export_digest

PACKAGES = ("scp-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def package_versions():
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def export_run(run_dir, which="best", step=None):
    """(arrays, manifest) of one checkpoint of RUN_DIR: the latest, step `step` or (`step="best"`) the best
    kept one; `which` = best-epoch or last-epoch parameters."""
    from scp_jax.engine.checkpoint import best_step, kept_steps, restore_items

    run_config_path(run_dir)  # a UserError for a folder that is no run dir
    directory = Path(run_dir) / "checkpoints"
    kept = kept_steps(directory)  # a UserError when there is none
    if step is None:
        step = kept[-1]
    elif step == "best":
        step = best_step(directory, kept)
    elif step not in kept:
        raise UserError(f"{directory}: no complete checkpoint step {step} (kept: {', '.join(map(str, kept))})")
    named, tables, metadata = restore_items(directory, step)
    if not (named["best_epoch"] >= 0).any():
        raise UserError(f"{directory / str(step)}: no member kept a best epoch (each diverged before a finite"
                        " validation score): nothing to export")
    prefix = {"best": "best_params.", "last": "params."}[which]
    # float32 whatever the training precision (bf16_state stores bf16 parameters).
    arrays = {"params." + name[len(prefix):]: np.asarray(v).astype(np.float32) for name, v in named.items()
              if name.startswith(prefix)}
    arrays.update(tables)
    # Each member's best validation score and epoch: `weighted` aggregation's weights, and which members vote.
    arrays.update({f"members.{name}": np.asarray(named[name]) for name in ("best_score", "best_epoch")})
    config = tomllib.loads(metadata["config_toml"])
    model = config["model"]
    manifest = {
        "format": FORMAT,
        "architecture": model["kind"],
        "model": model,
        "targets": config.get("targets", {}),
        "params": which,
        "epoch": step,
        "members": metadata["members"],
        "features": metadata["features"],
        "cell_types": metadata["cell_types"],
        "compounds": metadata["compounds"],
        "genes": metadata["genes"],
        "config_toml": metadata["config_toml"],
        "versions": package_versions(),
    }
    return arrays, manifest


def write_npz(path, arrays, manifest):
    """Atomically: a crash never leaves a half-written model under the final name."""
    text = json.dumps(manifest)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{MANIFEST: np.array(text), DIGEST: np.array(export_digest(arrays, text))}, **arrays)


def parse_args(argv):
    parser = ArgumentParser(prog="python -m scp_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="model.npz to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", dest="which", action="store_const", const="best", help="best-epoch parameters (default)")
    which.add_argument("--last", dest="which", action="store_const", const="last", help="last-epoch parameters")
    parser.add_argument("--step", type=step_arg, help="a kept checkpoint step, or best: the step whose last-epoch"
                        " parameters scored best (default: the latest)")
    return parser.parse_args(argv)


def step_arg(text):
    if text != "best" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a step number or 'best', got {text!r}")
    return text if text == "best" else int(text)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    arrays, manifest = export_run(args.run_dir, args.which or "best", args.step)  # a UserError for no run dir
    write_npz(args.out, arrays, manifest)
    members = len(manifest["members"])
    print(f"exported {members} members ({manifest['params']}-epoch params of checkpoint step {manifest['epoch']})"
          f" -> {args.out}")


if __name__ == "__main__":
    main()
