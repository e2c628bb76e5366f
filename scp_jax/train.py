"""`python -m scp_jax.train`: train a vmapped ensemble, cross-validate it, write a submission.

Flags are shorthands for config keys (`--ensemble 20` is `--set ensemble=20`), so the resolved
`config.toml` in the run dir is always the whole truth about a run.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from scp_jax.atomic import write_text
from scp_jax.config import load_config, run_config_path, to_toml
from scp_jax.errors import ArgumentParser, UserError, cli_main, exit_on_signal

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
FLAG_KEYS = {"ensemble": "ensemble", "epochs": "epochs", "seed": "seed", "data": "data.train", "id_map": "data.id_map"}


def parse_args(argv):
    parser = ArgumentParser(prog="python -m scp_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config (default: configs/default.toml)")
    parser.add_argument("--ensemble", type=int, help="number of members (seeds x folds)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data", help="de_train.parquet (default: the built-in synthetic world)")
    parser.add_argument("--id-map", help="id_map.csv (default: the one beside --data)")
    parser.add_argument("--out", help="run dir (default: runs/<timestamp>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest complete checkpoint")
    args = parser.parse_args(argv)
    if args.resume and any(getattr(args, flag) is not None for flag in (*FLAG_KEYS, "config", "out")) | bool(args.set):
        raise UserError("--resume RUN_DIR takes no other flags: the run continues with RUN_DIR/config.toml")
    return args


def keep_freed_heap(pad=64 << 20):
    """With glibc, keep `pad` bytes of freed heap instead of handing them back to the OS (M_TOP_PAD; it
    also fixes the mmap threshold at 128 KiB). Set before jax allocates anything: set after, it saved
    half as much. A pad or tunables the user set in the environment are left alone.

    Why: XLA:CPU's kernels allocate and free large buffers at every step; glibc hands the freed memory
    back and the next step faults it in again page by page. On 2 cores, 100 epochs of the default
    recipe with 20 members took 26.8 M page faults and 69-82 s of system time; with the pad, 4.0 M and
    21-28 s, and 11-24% less wall time in two back-to-back pairs. Where memory comes from changes, not
    what is computed (the run's files are byte-identical).
    """
    if platform.libc_ver()[0] != "glibc" or {"MALLOC_TOP_PAD_", "GLIBC_TUNABLES"} & set(os.environ):
        return
    ctypes.CDLL("libc.so.6").mallopt(-2, pad)  # -2: M_TOP_PAD


def resolve_config(args):
    """The run's config; data and feature file paths made absolute, so `--resume` works from any folder."""
    if args.resume:
        return load_config(run_config_path(args.resume))
    overrides = [f"{key}={json.dumps(str(value)) if isinstance(value, str) else value}"
                 for flag, key in FLAG_KEYS.items() if (value := getattr(args, flag)) is not None]
    if args.config is None and not DEFAULT_CONFIG.is_file():
        raise UserError(f"{DEFAULT_CONFIG}: default config not found (an install that is not editable leaves"
                        " configs/ behind); pass --config FILE or install with `pip install -e .`")
    config = load_config(args.config or DEFAULT_CONFIG, overrides + args.set)
    data = {key: os.path.abspath(value) for key in ("train", "id_map") if (value := getattr(config.data, key))}
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **data),
                               features=tuple(absolute_feature_path(spec) for spec in config.features))


def absolute_feature_path(spec):
    """`chemberta:FILE.npz` / `chemberta-model:DIR` with an absolute path, when it names one that exists."""
    kind, _, argument = spec.partition(":")
    if kind in ("chemberta", "chemberta-model") and os.path.exists(argument):
        return f"{kind}:{os.path.abspath(argument)}"
    return spec


METRICS_FILES = ("metrics.jsonl", "metrics-stage1.jsonl")


def untouched_start(run_dir, with_metrics=False):
    """Whether RUN_DIR holds exactly what a run writes before its first epoch: config.toml, empty metrics
    files and an empty checkpoints/ (`with_metrics`: metrics files with epochs in them too, a run that
    has checkpointed nothing yet)."""
    names = {path.name for path in run_dir.iterdir()}
    return ({"config.toml", "metrics.jsonl", "checkpoints"} <= names <= {"config.toml", *METRICS_FILES, "checkpoints"}
            and (with_metrics or all((run_dir / name).stat().st_size == 0 for name in names & set(METRICS_FILES)))
            and not any((run_dir / "checkpoints").iterdir()))


def prepare_run_dir(out, resume=False):
    """Create the run dir (or reuse it when resuming) and prove it is writable before any training time
    is spent. Returns it and the folders created for it, deepest first. A dir that holds files is
    refused, even one that looks like a fresh start: another run may be starting in it. Without `out`:
    runs/<timestamp>, with -2, -3, ... appended when runs start in the same second."""
    run_dir = Path(out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out and run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: run dir is not a directory")
    if out and not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir}: run dir already holds files; pick another --out")
    created = [path for path in run_dir.parents if not path.exists()]
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        if not out:
            run_dir = _claim_free_name(run_dir)
            created.insert(0, run_dir)
        elif not run_dir.exists():
            run_dir.mkdir()
            created.insert(0, run_dir)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"\0" * 1024)
        probe.unlink()
    except OSError as err:
        raise UserError(f"{run_dir}: run dir is not writable ({err.strerror})") from None
    return run_dir, created


def _claim_free_name(run_dir):
    """`run_dir`, or with -2, -3, ... appended where another run took it, made with an exclusive mkdir:
    two runs never share one."""
    for suffix in ("", *(f"-{i}" for i in range(2, 1000))):
        claimed = run_dir.with_name(run_dir.name + suffix)
        try:
            claimed.mkdir()
            return claimed
        except FileExistsError:
            continue
    raise UserError(f"{run_dir}: 999 runs started in this second; pass --out")


def discard_start(run_dir, created, with_metrics=False):
    """Remove an untouched start (`with_metrics`: see untouched_start) and the folders made for it: a run
    stopped by bad config or input before its first epoch, or interrupted before its first checkpoint,
    leaves nothing behind. Best effort: a folder another run has since put files in stays, and what
    stopped the run is what the user sees. Whether it removed the start."""
    with contextlib.suppress(OSError):
        if not untouched_start(run_dir, with_metrics):
            return False
        # checkpoints/ first: its rmdir fails, touching nothing else, if a save began meanwhile
        (run_dir / "checkpoints").rmdir()
        for path in run_dir.iterdir():
            path.unlink()
        print(f"run dir {run_dir} removed again: nothing was {'checkpointed' if with_metrics else 'trained'}",
              flush=True)  # the header named it
        for folder in created:
            folder.rmdir()
        return True
    return False


def interrupt_farewell(run_dir, created, resumed, word):
    """The line a run stopped by a signal while training ends with ("interrupted" by Ctrl-C,
    "terminated" by SIGTERM): where to resume from, or that nothing was kept, in which case it removes
    the run dir, so its --out can be used again."""
    from scp_jax.engine.checkpoint import complete_steps

    steps = complete_steps(run_dir / "checkpoints")
    if steps:
        return f"{word}: {run_dir} keeps checkpoints up to epoch {steps[-1]}; continue with --resume {run_dir}"
    if not resumed and discard_start(run_dir, created, with_metrics=True):
        return f"{word} before the first checkpoint: nothing kept"
    return f"{word} before the first checkpoint: nothing to resume in {run_dir}"


def truncate_metrics(path, epoch):
    """Drop metrics.jsonl lines after `epoch` (atomically): a resumed run rewrites them. A line that is
    not a whole record (a run killed while appending it) is dropped too: it is past the checkpoint."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["epoch"] <= epoch:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        write_text(path, "".join(kept))


class ChunkLog:
    """Appends one metrics.jsonl line per epoch and prints one progress line per chunk.

    Its first chunk (which also compiles) first drops any lines from that chunk on, left by a run that
    died after its last checkpoint, so a resumed run's metrics.jsonl equals an uninterrupted run's.
    """

    def __init__(self, path, config, label=""):
        self.path, self.config, self.first, self.label = path, config, True, label
        self.path.touch()

    def __call__(self, epoch, metrics, seconds):
        n_epochs, n_members = metrics["val_mrrmse"].shape[1], metrics["val_mrrmse"].shape[0]
        if self.first:
            truncate_metrics(self.path, epoch - n_epochs)
        with self.path.open("a") as f:
            for i in range(n_epochs):
                line = {"epoch": epoch - n_epochs + i + 1}
                line.update({name: np.round(values[:, i].astype(float), 6).tolist() for name, values in metrics.items()})
                f.write(json.dumps(line) + "\n")
        running = metrics["running"][:, -1]
        print(f"{self.label}epoch {epoch:4d}/{self.config.epochs}  running {running.sum()}/{n_members}"
              + self.scores(metrics, running)
              + f"  {metrics['running'].sum() / seconds:8.1f} member-epochs/s" + (" (incl. compile)" if self.first else ""),
              flush=True)
        self.first = False

    def scores(self, metrics, running):
        """The running members' last validation and train scores, as far as they are finite."""
        if not running.any():
            return "  every member has stopped"
        val, loss = (values[running, -1] for values in (metrics["val_mrrmse"], metrics["train_loss"]))
        val, loss = val[np.isfinite(val)], loss[np.isfinite(loss)]
        text = ("  no validation rows" if self.config.cv == "full"
                else f"  val MRRMSE best {val.min():.4f} mean {val.mean():.4f}" if len(val) else "  no finite val MRRMSE")
        return text + (f"  train loss {loss.mean():.4f}" if len(loss) else "  no finite train loss")


def member_rows(result):
    """The member table with each member's outcome: its score, the epoch it kept and how it ended. Epochs
    count from 1, as in metrics.jsonl; None: no kept epoch (diverged first) / never stopped."""
    rows = []
    for row, score, best, stopped, diverged in zip(result.members.rows(), result.member_cv, result.best_epoch,
                                                    result.stopped_epoch, result.diverged):
        status = "diverged" if diverged else "early_stopped" if stopped >= 0 else "completed"
        rows.append(dict(row, cv_mrrmse=float(score) if np.isfinite(score) else None,
                         best_epoch=int(best) + 1 if best >= 0 else None, status=status,
                         stopped_epoch=int(stopped) + 1 if stopped >= 0 else None))
    return rows


def cv_report(result):
    """cv.json: the scheme and member table; CV fields are null where nothing is validated (cv = "full")."""
    return {
        "scheme": result.folds.scheme,
        "folds": result.folds.n_folds,
        "ensemble_cv_mrrmse": result.ensemble_cv,
        "baselines_cv_mrrmse": result.baseline_cv,
        "members": member_rows(result),
    }


def write_member_table(path, rows):
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join("" if row[c] is None else str(row[c]) for c in columns) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    config = resolve_config(args)
    keep_freed_heap()
    import jax

    from scp_jax.engine.devices import broadcast_text, initialize_distributed

    initialize_distributed(config.distributed)
    from scp_jax.data.dataset import input_paths, load_id_map, load_train, write_oof, write_submission
    from scp_jax.engine.checkpoint import Checkpointer
    from scp_jax.engine.cv import make_folds
    from scp_jax.engine.trainer import train_ensemble
    from scp_jax.report import write_report

    train_path, id_map_path = input_paths(config.data)
    train = load_train(train_path)
    queries = load_id_map(id_map_path, train) if id_map_path else None
    folds = make_folds(config.cv, train, config.folds, config.seed)  # folds that validate nothing stop here
    # In a multi-process run every process trains its share of the members; process 0 writes the run
    # dir (the checkpoints are written by all, through Orbax).
    writer = jax.process_index() == 0
    chosen, created = "", []
    if writer:
        run_dir, created = prepare_run_dir(args.resume or args.out, resume=bool(args.resume))
        world = "" if config.data.train else f" (the built-in synthetic world {train_path.parent})"
        print(f"run dir {run_dir}: {len(train.targets)} rows x {len(train.genes)} genes{world},"
              f" {config.n_members()} members")
        if queries is None:
            print(f"no {train_path.with_name('id_map.csv')}: no submission.csv (pass --id-map for one)")
        chosen = str(run_dir)
    run_dir = Path(broadcast_text(chosen))  # a default --out is a timestamp: process 0's

    start = time.perf_counter()
    farewell = functools.partial(interrupt_farewell, run_dir, created, bool(args.resume))
    if not writer:  # another process of a multi-process run: process 0 owns the run dir
        farewell = lambda word: word  # noqa: E731
    try:
        if writer and not args.resume:
            write_text(run_dir / "config.toml", to_toml(config))
        with exit_on_signal(farewell), \
                Checkpointer(run_dir / "checkpoints", config, train, bool(args.resume), queries) as checkpointer:
            log = ChunkLog(run_dir / "metrics.jsonl", config) if writer else None
            stage1_log = None
            if writer and config.pseudo_labels.enabled:
                stage1_log = ChunkLog(run_dir / "metrics-stage1.jsonl", config, "stage 1 ")
            result = train_ensemble(config, train, queries, folds=folds, on_chunk=log, checkpointer=checkpointer,
                                    on_pseudo_chunk=stage1_log)
    except BaseException as err:
        if writer and not args.resume and isinstance(err, (UserError, KeyboardInterrupt)):
            discard_start(run_dir, created)
        raise
    if not (result.best_epoch >= 0).any():
        raise UserError(f"{run_dir}: every member diverged (NaN/Inf) before a finite score, so nothing is left to"
                        " predict with; lower optim.learning_rate or optim.clip_norm")
    if not writer:
        return
    report = cv_report(result)
    write_text(run_dir / "cv.json", json.dumps(report, indent=2) + "\n")
    write_member_table(run_dir / "members.csv", report["members"])
    for row in report["members"]:
        if row["status"] == "diverged":
            kept = (f"kept epoch {row['best_epoch']}" if row["best_epoch"]
                    else "it has no finite epoch and is left out of the ensemble")
            print(f"member {row['member']} diverged (NaN/Inf) at epoch {row['stopped_epoch']}; {kept}")
    if result.ensemble_cv is not None:
        write_oof(run_dir / "oof.parquet", train, result.oof_predictions)
    if queries is not None:
        write_submission(run_dir / "submission.csv", queries.ids, train.genes, result.test_predictions)
    write_report(run_dir)
    seconds = time.perf_counter() - start
    if result.ensemble_cv is None:
        print(f"cv {result.folds.scheme}: no validation rows | {seconds:.1f} s -> {run_dir}")
        return
    best_baseline = min(result.baseline_cv, key=result.baseline_cv.get)
    print(
        f"CV MRRMSE ({result.folds.scheme}) ensemble {result.ensemble_cv:.4f} | zeros {result.baseline_cv['zeros']:.4f}"
        f" | best baseline {best_baseline} {result.baseline_cv[best_baseline]:.4f} | {seconds:.1f} s -> {run_dir}"
    )


if __name__ == "__main__":
    main()
