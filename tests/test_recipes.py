"""The recipes in configs/: each is valid and builds its model; the two-stage one runs from the CLI."""

import json
from pathlib import Path

import jax
import pytest
from flax import nnx

from scp_jax.config import load_config
from scp_jax.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.toml"))


def test_the_recipes_are_all_there():
    assert {"default", "ci", "first_place", "second_place", "third_place", "transformer"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_valid_and_builds_its_model(recipe):
    config = load_config(CONFIGS / f"{recipe}.toml")
    outputs = config.targets.svd or 18211
    out = jax.eval_shape(lambda x: build_model(config, (6, 2048, 100, 46), outputs, nnx.Rngs(0))(x),
                         jax.ShapeDtypeStruct((3, 2200), "float32"))
    assert out.shape == (3, outputs)


def test_third_place_recipe_runs_both_stages_from_the_cli(small_world, tmp_path, capsys):
    from scp_jax.train import main as train_main

    run = tmp_path / "run"
    train_main(["--config", str(CONFIGS / "third_place.toml"), "--data", str(small_world / "de_train.parquet"),
                "--out", str(run), "--ensemble", "3", "--epochs", "2", "--set", "model.hidden=[16]",
                "--set", "targets.svd=8", "--set", "checkpoint_every=2"])
    output = capsys.readouterr().out
    assert "stage 1 epoch" in output and "CV MRRMSE (b_myeloid)" in output
    for name in ("metrics-stage1.jsonl", "metrics.jsonl", "cv.json", "submission.csv", "report.png"):
        assert (run / name).is_file(), name
    assert len((run / "metrics-stage1.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "cv.json").read_text())["scheme"] == "b_myeloid"
