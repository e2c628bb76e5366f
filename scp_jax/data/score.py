"""Score a submission on a synthetic world against its hidden truth, next to baselines and the oracle."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from scp_jax import metrics
from scp_jax.data.dataset import load_id_map, load_train, parse_ids, read_csv, read_parquet, show
from scp_jax.errors import UserError

ORACLES = ("oracle", "effect_oracle")  # hidden/NAME.parquet, scored when the world has it


def read_answers(path, genes, ids):
    """Hidden answer file (id + genes), rows aligned to `ids`."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (is this a synthetic world?)")
    table = read_parquet(path)
    names = set(table.column_names)  # a list: 18,212 lookups in it took minutes
    missing = [c for c in ("id", *genes) if c not in names]
    if missing:
        raise UserError(f"{path}: missing column '{missing[0]}'")
    order = pd.Index(table.column("id").to_numpy()).get_indexer(ids)
    if (order < 0).any():  # get_indexer's -1 would silently pick the last row
        raise UserError(f"{path}: id {show(ids[int(np.flatnonzero(order < 0)[0])])} from id_map is missing")
    answers = np.stack([table.column(g).to_numpy() for g in genes], axis=1)[order]
    finite = np.isfinite(answers)
    if not finite.all():  # a null too: it reads as NaN
        row, j = np.argwhere(~finite)[0]
        raise UserError(f"{path}: gene column '{genes[j]}' has non-finite value {answers[row, j]} at id {show(ids[row])}")
    return answers


def read_submission(path, ids, genes):
    """Read a submission CSV and return its predictions [ids, genes] in the given order."""
    path = Path(path)
    frame = read_csv(path, text=("id",), required=("id",))
    columns, expected = set(frame.columns), set(genes)
    missing = frame["id"].isna().to_numpy()
    if missing.any():
        raise UserError(f"{path}: column 'id' is empty at row {int(np.flatnonzero(missing)[0])}")
    frame["id"] = parse_ids(frame["id"])
    missing = [g for g in genes if g not in columns]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} gene column(s), first '{missing[0]}'")
    extra = [c for c in frame.columns if c != "id" and c not in expected]
    if extra:
        raise UserError(f"{path}: unexpected column '{extra[0]}' (not a training gene)")
    duplicated = frame["id"].duplicated().to_numpy()
    if duplicated.any():
        raise UserError(f"{path}: duplicate id {show(frame['id'].iloc[int(np.flatnonzero(duplicated)[0])])}")
    position = pd.Index(frame["id"]).get_indexer(ids)
    if (position < 0).any():
        raise UserError(f"{path}: id {show(ids[int(np.flatnonzero(position < 0)[0])])} from id_map is missing")
    if len(frame) != len(ids):
        unknown = frame["id"][~frame["id"].isin(ids)].iloc[0]
        raise UserError(f"{path}: id {show(unknown)} is not in id_map")
    values = frame[list(genes)]
    numeric = pd.api.types.is_numeric_dtype
    non_numeric = [g for g, kind in values.dtypes.items() if not numeric(kind) or pd.api.types.is_bool_dtype(kind)]
    if non_numeric:
        gene = non_numeric[0]
        unparsed = pd.to_numeric(values[gene], errors="coerce").isna().to_numpy()
        row = int(np.flatnonzero(unparsed)[0]) if unparsed.any() else 0  # a column of True/False: its first
        raise UserError(
            f"{path}: gene column '{gene}' has non-numeric value {show(values[gene].iloc[row])}"
            f" at id {show(frame['id'].iloc[row])}"
        )
    predictions = values.to_numpy(np.float64)
    finite = np.isfinite(predictions)
    if not finite.all():
        row, j = np.argwhere(~finite)[0]
        raise UserError(
            f"{path}: gene column '{genes[j]}' has non-finite value {predictions[row, j]}"
            f" at id {show(frame['id'].iloc[row])}"
        )
    return predictions[position]


def score(world_dir, submission_path):
    """MRRMSE of the submission, the oracles (when the world has them) and the baselines fitted on de_train."""
    world = Path(world_dir)
    train = load_train(world / "de_train.parquet")
    queries = load_id_map(world / "id_map.csv", train)
    predictions = read_submission(submission_path, queries.ids, train.genes)
    truth = read_answers(world / "hidden" / "truth.parquet", train.genes, queries.ids)
    with np.errstate(over="ignore"):  # a finite prediction past 1e154 scores inf, without numpy's warnings
        scores = {"submission": metrics.mrrmse(truth, predictions)}
    for oracle in ORACLES:
        if (world / "hidden" / f"{oracle}.parquet").is_file():
            answers = read_answers(world / "hidden" / f"{oracle}.parquet", train.genes, queries.ids)
            scores[oracle] = metrics.mrrmse(truth, answers)
    baselines = metrics.fit_baselines(
        train.targets, train.cell_index, train.compound_index, np.ones(len(train.targets), bool),
        queries.cell_index, queries.compound_index,
    )
    scores.update({name: metrics.mrrmse(truth, pred) for name, pred in baselines.items()})
    return scores


def report(scores, world_dir, submission_path, as_json=False):
    """Table (or JSON), ending in one greppable `score:` line."""
    baselines = {k: v for k, v in scores.items() if k in metrics.BASELINES}
    best = min(baselines, key=baselines.get)
    if as_json:
        return json.dumps({"world": str(world_dir), "submission_path": str(submission_path), "best_baseline": best,
                           "scores": scores}, indent=2)
    lines = [f"world {world_dir}, submission {submission_path}"]
    lines += [f"  {name:<16} {value:.5f}" for name, value in scores.items()]
    summary = f"score: submission={scores['submission']:.5f}"
    if "oracle" in scores:
        summary += f" oracle={scores['oracle']:.5f}"
    summary += f" zeros={scores['zeros']:.5f} best_baseline={best}:{baselines[best]:.5f}"
    return "\n".join(lines + [summary])
