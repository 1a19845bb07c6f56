"""`mmdistill` command line."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from omegaconf import OmegaConf

from mmdistill.config import DEFAULT_CONFIG, ConfigError, check_paths, load_config


def _say(message: str) -> None:
    """One line to stderr in one write: the processes of a launch share the stream, and print's
    separate write of the newline lets their lines run together."""
    sys.stderr.write(f"mmdistill: {message}\n")
    sys.stderr.flush()


def _config(path, overrides: list[str]):
    """The resolved config, or None after printing its one-line error."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        _say(str(exc))
        return None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (a KeyError's without the quotes str() adds)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _traceback(args: argparse.Namespace) -> bool:
    """--traceback or MMDISTILL_TRACEBACK=1: a bad input's error with its traceback, not one line."""
    return bool(getattr(args, "traceback", False)) or os.environ.get("MMDISTILL_TRACEBACK", "") not in ("", "0")


def _offline() -> None:
    """Models and tokenizers are loaded from local directories only (models/loading.py passes
    local_files_only too); set before transformers or huggingface_hub is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def _train(args: argparse.Namespace) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no CONFIG given, only overrides
        config, overrides = None, [config, *overrides]
    cfg = _config(config or DEFAULT_CONFIG, overrides)
    if cfg is None:
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    try:
        check_paths(cfg)  # a missing model or data path: one line in a second, before torch is imported
        launcher = None if args.no_launch else _default_launch()
    except ConfigError as exc:
        _say(str(exc))
        return 2
    if launcher is not None:
        _say(f"{launcher}: accelerate's default config starts the processes (--no-launch: run here)")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "-m", "mmdistill", "train",
               *([config] if config is not None else []), *overrides, *(["--traceback"] if args.traceback else [])]
        return subprocess.call(cmd)
    _offline()
    from mmdistill.distributed.launch import launcher_fsdp
    from mmdistill.training.loop import train
    from mmdistill.training.stopping import Stopped

    try:
        launcher_fsdp(os.environ)  # an accelerate config mmdistill cannot honour: one line per process, not a traceback
    except (ValueError, NotImplementedError) as exc:
        _say(str(exc))
        return 2
    try:
        train(cfg)
    except FloatingPointError as exc:  # a non-finite loss, gradient or weight: every rank stops at the same step
        _say(str(exc))
        return 1
    except Stopped as exc:  # a scheduler's signal: checkpointed, resumable
        _say(str(exc))
        return exc.code
    except (ValueError, KeyError, OSError) as exc:
        # Bad input (a config, a path, data, a model, a checkpoint): one line, as config errors;
        # ConfigError, ShardError, EmptySplit, ContextTooLong, TemplateError, CheckpointError are
        # ValueErrors, a missing field a KeyError, a run directory that holds checkpoints an OSError.
        if _traceback(args):
            raise
        _say(_one_line(exc))
        return 2
    return 0


def _default_launch() -> str | None:
    """accelerate's default config file (written by `accelerate config`) when it asks for more
    than one process or for sharding, and this process was not itself started by a launcher:
    then `mmdistill train` runs as `accelerate launch -m mmdistill train` would."""
    if any(k in os.environ for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")):
        return None
    from accelerate.commands.config import default_config_file, load_config_from_file

    if not os.path.isfile(default_config_file):
        return None
    try:
        found = load_config_from_file(default_config_file)
    except Exception as exc:  # accelerate raises whatever its yaml/json/dataclass parsing raises
        why = " ".join(str(exc).split())  # yaml's messages span lines
        raise ConfigError(f"accelerate's default config {default_config_file}: {why} "
                          "(mmdistill train --no-launch ignores it)") from None
    kind = str(getattr(found.distributed_type, "value", found.distributed_type))
    if (found.num_processes or 1) > 1 or kind in ("FSDP", "DEEPSPEED"):
        return default_config_file
    return None


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    target, run_dir = args.target, None
    if Path(target).is_dir() and (Path(target) / "config.yaml").is_file():
        run_dir, target = Path(target), str(Path(target) / "config.yaml")
    cfg = _config(target, list(args.overrides))
    if cfg is None:
        return 2
    role = cfg.eval.model
    if role.startswith("teacher"):
        models = ("teacher.model",)
    else:  # a run's student is its run directory's, checked when it loads
        models = () if run_dir and role in ("student", "student_priv") else ("student",)
    try:
        check_paths(cfg, models=models, eval_splits=True)  # before torch is imported, and any model loads
    except ConfigError as exc:
        _say(str(exc))
        return 2
    _offline()
    from mmdistill.evaluation.evaluate import run_eval
    from mmdistill.reporting.tables import eval_markdown, write_eval

    try:
        result, out_dir = run_eval(cfg, run_dir)
        write_eval(result, out_dir)
    except (ValueError, KeyError, OSError) as exc:
        if _traceback(args):
            raise
        _say(_one_line(exc))
        return 2
    print(eval_markdown(result))
    for warning in result.get("warnings", []):  # also at the top of the table; here for a reader of stderr
        _say(warning)
    print(f"results written to {out_dir}/{result['label']}.json and .md")
    return 0


def _selfcheck(args: argparse.Namespace) -> int:
    cfg = _config(args.config or "tiny", list(args.overrides))
    if cfg is None:
        return 2
    _offline()
    from mmdistill.evaluation.selfcheck import main as selfcheck_main

    return selfcheck_main(cfg)


def _plot(args: argparse.Namespace) -> int:
    from mmdistill.reporting.plot import PlotError, plot_runs

    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        out = plot_runs(args.run_dirs, args.out, keys=keys, smooth=args.smooth)
    except PlotError as exc:
        _say(str(exc))
        return 2
    print(out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from mmdistill.reporting.compare import report_markdown
    from mmdistill.reporting.tables import ReportError, write_text

    try:
        text = report_markdown(args.run_dirs, label=args.label, refs_dir=args.refs)
        if args.out:
            write_text(args.out, text)
    except ReportError as exc:
        _say(str(exc))
        return 2
    print(text, end="")
    return 0


def _data(args: argparse.Namespace) -> int:
    from data_tools.cli import main as data_main

    return data_main(args.rest)


class _Formatter(argparse.HelpFormatter):
    """argparse measures subcommand names one indent short; without this, long names wrap."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += 2 * self._indent_increment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdistill",
                                     description="On-policy distillation with privileged information.",
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a student: mmdistill train [CONFIG] [key=value ...]",
                       description="Train a student. CONFIG is a YAML under configs/ or a path "
                                   "(default: configs/default.yaml); "
                                   "dotted key=value overrides merge on top, e.g. train.max_steps=10 method=sft.")
    p.add_argument("config", nargs="?", help="configs/NAME.yaml, NAME, or a path")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-launch", action="store_true",
                   help="train in this process even when accelerate's default config (`accelerate config`) "
                        "asks for several")
    p.add_argument("--traceback", action="store_true",
                   help="a bad input's error with its traceback, not one line (also MMDISTILL_TRACEBACK=1)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="score a student (or the teacher) on test splits: mmdistill eval CONFIG_OR_RUN_DIR",
                       description="Evaluate a run's student (RUN_DIR) or a config's model on eval.splits "
                                   "(default: the data's test split): accuracy with a 95% interval, pass@k, "
                                   "lengths, leakage. eval.model=student_init|teacher|teacher_priv gives the "
                                   "reference rows; student_priv and student_init_priv score the student reading "
                                   "the privileged context (DOPD's self-teacher).")
    p.add_argument("target", help="a run directory (with config.yaml) or a config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.splits={ood: data/ood}")
    p.add_argument("--traceback", action="store_true",
                   help="a bad input's error with its traceback, not one line (also MMDISTILL_TRACEBACK=1)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("selfcheck", help="check each method: zero loss when teacher == student",
                       description="Runs every distillation method with a frozen copy of the student as teacher and "
                                   "empty privileged fields; each must give zero loss and zero gradient. "
                                   "CONFIG (default: tiny) names the student to check.")
    p.add_argument("config", nargs="?", help="configs/NAME.yaml, NAME, or a path (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_selfcheck)

    p = sub.add_parser("plot", help="training curves to PNG: mmdistill plot RUN_DIR [RUN_DIR ...]",
                       description="Plots each run's metrics.jsonl, one subplot per metric (share_*, loss_* and "
                                   "time_* keys share one), x = step, one line per run. Writes RUN_DIR/curves.png "
                                   "(first run) unless --out is given, and prints the path.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument("--out", metavar="FILE.png", help="output image (default: first RUN_DIR/curves.png)")
    p.add_argument("--keys", metavar="K1,K2,...",
                   help="comma-separated metrics or globs, e.g. loss,reverse_kl,share_* (default: every numeric key)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="moving average over N logged points, raw curve faint behind (default: 1, none)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("report", help="compare runs' eval results: mmdistill report RUN_DIR [RUN_DIR ...]",
                       description="One Markdown table of every run's eval/LABEL.json (rows: runs, seeds of one "
                                   "experiment averaged; columns: splits and their average), with the teacher and the "
                                   "untrained student (eval/teacher.json, eval/student_init.json of any run) as "
                                   "reference rows and the gap recovered against them; then ACC/BWT/FWT of runs with "
                                   "a continual.json. Prints the table.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding eval/LABEL.json")
    p.add_argument("--out", metavar="FILE.md", help="also write the table to this file")
    p.add_argument("--label", default="student", help="which eval result to compare (default: student)")
    p.add_argument("--refs", metavar="DIR", help="an eval output directory holding the reference rows (teacher.json, "
                                                 "student_init.json, ...), searched before the runs' own eval/")
    p.set_defaults(func=_report)

    sub.add_parser("data", help="build and inspect datasets (same as python -m data_tools)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":  # data_tools parses its own arguments
        return _data(argparse.Namespace(rest=argv[1:]))
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown or (extra and args.command not in ("train", "selfcheck", "eval")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:  # overrides given after --print-config
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
