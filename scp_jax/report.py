"""`python -m scp_jax.report RUN_DIR`: one picture of a run, RUN_DIR/report.png.

metrics.jsonl and cv.json hold every number, but people would rather look than read: the picture shows
how each member's validation score moved, how training went, and whether the ensemble beats its members
and the simple baselines.
"""

import json
from pathlib import Path

import numpy as np

from scp_jax.atomic import atomic_path
from scp_jax.errors import ArgumentParser, UserError, cli_main

METRICS = ("train_loss", "val_mrrmse", "running")
STATUS_COLORS = {"completed": "C0", "early_stopped": "C2", "diverged": "C3"}


def load_metrics(path):
    """(epochs [E], {name: [members, E]}) from metrics.jsonl; a later line for the same epoch wins."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    rows = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            values = [np.array(row[name], float) for name in METRICS]
            epoch = int(row["epoch"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: line {number}: expected JSON with epoch, {', '.join(METRICS)}") from None
        if any(v.shape != values[0].shape or v.ndim != 1 for v in values):
            raise UserError(f"{path}: line {number}: per-member lists differ in length")
        rows[epoch] = values
    if not rows:
        raise UserError(f"{path}: no epoch lines")
    epochs = np.array(sorted(rows))
    if len({rows[e][0].shape for e in epochs}) > 1:
        raise UserError(f"{path}: the member count changes between lines")
    return epochs, {name: np.stack([rows[e][k] for e in epochs], axis=1) for k, name in enumerate(METRICS)}


def load_cv(path):
    """cv.json as a dict; it must hold a scheme and a member table."""
    try:
        cv = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cv, dict) or "scheme" not in cv or not isinstance(cv.get("members"), list):
        raise UserError(f"{path}: expected an object with 'scheme' and a 'members' list")
    return cv


def _score(value):
    return np.nan if value is None else float(value)


def write_report(run_dir):
    """Draw RUN_DIR/report.png (atomically) from its metrics.jsonl and cv.json; returns the png's path."""
    path = Path(run_dir) / "report.png"
    fig = draw(run_dir)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def draw(run_dir):
    """The report's matplotlib Figure: validation curves, train loss, and the spread of member scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    run_dir = Path(run_dir)
    epochs, metrics = load_metrics(run_dir / "metrics.jsonl")
    cv = load_cv(run_dir / "cv.json")
    members = cv["members"]
    n = len(members)
    if metrics["running"].shape[0] != n:
        raise UserError(f"{run_dir / 'cv.json'}: {n} members but metrics.jsonl has {metrics['running'].shape[0]}")
    stopped = metrics["running"] == 0  # epochs after a member stopped are not training
    val = np.where(stopped | ~np.isfinite(metrics["val_mrrmse"]), np.nan, metrics["val_mrrmse"])
    loss = np.where(stopped | ~np.isfinite(metrics["train_loss"]), np.nan, metrics["train_loss"])
    colors = [STATUS_COLORS.get(m.get("status"), "gray") for m in members]
    ensemble = _score(cv.get("ensemble_cv_mrrmse"))
    baselines = {k: v for k, v in (cv.get("baselines_cv_mrrmse") or {}).items() if v is not None}
    baseline_colors = {name: f"C{4 + k % 6}" for k, name in enumerate(baselines)}
    validated = bool(np.isfinite(val).any())

    fig = Figure(figsize=(12, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    curves, losses, spread = fig.subplots(1, 3)

    # 1. validation curves with the epoch each member kept: its best, or its last with keep = "last"
    for i, member in enumerate(members):
        curves.plot(epochs, val[i] if validated else loss[i], lw=0.8, alpha=0.5, color=colors[i])
        at = np.flatnonzero(epochs == member.get("best_epoch"))
        if validated and len(at) and np.isfinite(val[i, at[0]]):
            curves.plot(epochs[at[0]], val[i, at[0]], "o", ms=3, color=colors[i])
    if validated:
        curves.set(title="validation MRRMSE per member (dot: kept epoch)", xlabel="epoch", ylabel="MRRMSE")
        lines = {}
        if np.isfinite(ensemble):
            lines[f"ensemble CV {ensemble:.4f}"] = (ensemble, "black")
        if baselines:
            best = min(baselines, key=baselines.get)
            for name in sorted({best, "zeros"} & baselines.keys(), key=baselines.get):
                lines[f"{name} baseline {baselines[name]:.4f}"] = (baselines[name], baseline_colors[name])
        for label, (y, color) in lines.items():
            curves.axhline(y, ls="--", lw=1.2, color=color, label=label)
        if lines:
            curves.legend(fontsize="small")
        # Early epochs far above every reference line and every member's best would flatten the part
        # worth seeing; a fold whose whole curve sits above the references stays in view.
        best = max(np.nanmin(v) for v in val if np.isfinite(v).any())
        top = max(1.15 * max((y for y, _ in lines.values()), default=np.inf), 1.05 * best)
        if np.nanmin(val) < top < np.nanmax(val):
            curves.set_ylim(top=top)
    else:
        curves.set(title="train loss per member (no validation rows)", xlabel="epoch", ylabel="train loss")

    # 2. train loss curves
    for i in range(n):
        losses.plot(epochs, loss[i], lw=0.8, alpha=0.5, color=colors[i])
    losses.set(title="train loss per member", xlabel="epoch", ylabel="train loss")
    if np.isfinite(loss).any() and np.nanmin(loss) > 0:
        losses.set_yscale("log")
    statuses = dict.fromkeys(m.get("status") for m in members)
    losses.legend(handles=[Line2D([], [], color=STATUS_COLORS.get(s, "gray"), label=str(s)) for s in statuses],
                  fontsize="small")

    # 3. spread of member scores against the ensemble and the baselines
    scores = np.array([_score(m.get("cv_mrrmse")) for m in members])
    scored = np.isfinite(scores)
    if scored.any() or baselines or np.isfinite(ensemble):
        jitter = np.random.default_rng(0).uniform(0.05, 0.4, n)  # the legend takes the upper part
        spread.scatter(scores[scored], jitter[scored], s=14, alpha=0.7, c=[c for c, s in zip(colors, scored) if s])
        if np.isfinite(ensemble):
            spread.axvline(ensemble, color="black", lw=2, label=f"ensemble {ensemble:.4f}")
        for name, value in sorted(baselines.items(), key=lambda item: item[1]):
            spread.axvline(value, ls="--", lw=1.2, color=baseline_colors[name], label=f"{name} {value:.4f}")
        spread.set(title=f"member CV MRRMSE ({scored.sum()} of {n} scored)", xlabel="MRRMSE", ylim=(0, 1), yticks=[])
        if np.isfinite(ensemble) or baselines:
            spread.legend(fontsize="x-small", loc="upper right")
    else:
        spread.set_axis_off()
        spread.text(0.5, 0.5, "no validation scores", ha="center", va="center", transform=spread.transAxes)

    folds = f", {cv['folds']} folds" if cv.get("folds") else ""
    score = f"ensemble CV MRRMSE {ensemble:.4f}" if np.isfinite(ensemble) else "no ensemble CV score"
    fig.suptitle(f"cv {cv['scheme']}{folds}  |  {n} members  |  {score}")
    return fig


@cli_main
def main(argv=None):
    parser = ArgumentParser(prog="python -m scp_jax.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir}: run dir not found")
    print(f"wrote {write_report(args.run_dir)}")


if __name__ == "__main__":
    main()
