"""`ganpipe <command>`: the DVC stages and the user-facing tools, one entry point.

Expected failures (bad params, failed downloads, malformed files, a wrong flag)
print one clear line and exit non-zero without a traceback; ``--debug`` or
``GANPIPE_DEBUG=1`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from gan.data import DATASETS, IDXError
from pipeline.artifacts import NotWritableError
from pipeline.config import PARAMS_FILE, ConfigError, load_config
from pipeline.fetch import FetchError

USER_ERRORS = (ConfigError, FetchError, IDXError, NotWritableError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    from gan.engine import DivergedError
    from pipeline.generate import SampleError
    from pipeline.spool import TrackerError
    from pipeline.train import TrainingDiverged

    return (*USER_ERRORS, DivergedError, TrainingDiverged, TrackerError, SampleError)


def _stage(module_name: str):
    """A command that loads params.yaml and runs ``pipeline.<module>.run(cfg, dataset)``."""
    def command(args: argparse.Namespace) -> None:
        import importlib

        cfg = load_config(args.params, _preset_override(args))
        if args.dataset not in cfg.data.datasets:
            raise ConfigError(f"{args.params}: --dataset {args.dataset!r} is not in data.datasets "
                              f"(allowed: {', '.join(cfg.data.datasets)})")
        options = {"fresh": args.fresh} if module_name == "train" else {}
        importlib.import_module(f"pipeline.{module_name}").run(cfg, args.dataset, **options)
    return command


def _tool(name: str):
    def command(args: argparse.Namespace) -> None:
        from pipeline import generate

        cfg = load_config(args.params)
        options = dict(checkpoint=args.checkpoint, mlflow_run=args.mlflow_run, n=args.n, seed=args.seed)
        if name == "sample":
            generate.sample_command(cfg, args.dataset, output=args.output, label=args.label,
                                    per_class=args.per_class, **options)
        else:
            generate.evaluate_command(cfg, args.dataset, **options)
    return command


def _sweep(args: argparse.Namespace) -> None:
    from pipeline import sweep

    sweep.run(load_config(args.params, _preset_override(args)), fresh=args.fresh)


def _preset_override(args: argparse.Namespace) -> dict:
    """--preset NAME as a params override (what `dvc exp run -S preset=NAME` sets in params.yaml)."""
    preset = getattr(args, "preset", None)
    return {"preset": preset} if preset else {}


def _ui(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pipeline.tracking import serve_ui

    raise SystemExit(serve_ui(Path("."), host=args.host, port=args.port))


def _sync(args: argparse.Namespace) -> None:
    """Deliver what outages of the tracking server left spooled; what was delivered is never sent again."""
    from pathlib import Path

    from pipeline.spool import TrackerError, deliver_all, spool_root
    from pipeline.tracking import tracking_uri
    from pipeline.loop import storage_path

    cfg, root = load_config(args.params), Path(".").resolve()
    folder = Path(args.spool) if args.spool else spool_root(storage_path(cfg, root))
    if not args.spool and not folder.exists():
        print(f"ganpipe sync: nothing spooled ({folder} does not exist)")
        return
    uri = tracking_uri(cfg, root)
    delivered, left = deliver_all(uri, folder, args.timeout)
    print(f"ganpipe sync: {delivered} record(s) delivered to {uri} from {folder}; {left} still spooled")
    if left:
        raise TrackerError(f"MLflow at {uri} did not answer: {left} record(s) stay in {folder}; run it again later")


class OneLineParser(argparse.ArgumentParser):
    """A wrong flag is one line naming it (``--help`` shows the usage), as every other user error is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


PRESET_HELP = "a recipe from presets/ laid over params.yaml (default: params.yaml's preset)"
FRESH_HELP = "start over, even when an interrupted run with the same params could be resumed"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ganpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("GANPIPE_DEBUG") == "1",
                        help="show the traceback of any error (also GANPIPE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in [("fetch", "download the raw IDX files of a dataset"),
                            ("preprocess", "parse raw files into data/processed/<dataset>.npz"),
                            ("evaluator", "train the quality evaluator and record the floor/ceilings"),
                            ("train", "train a GAN on Ray Train, logged to MLflow")]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--dataset", required=True, choices=DATASETS)
        if name == "train":
            sub.add_argument("--preset", help=PRESET_HELP)
            sub.add_argument("--fresh", action="store_true", help=FRESH_HELP)
        sub.set_defaults(func=_stage(name))

    sweep = commands.add_parser("sweep", help="Ray Tune over params.yaml's sweep.space, logged to MLflow")
    sweep.add_argument("--preset", help=PRESET_HELP)
    sweep.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    sweep.set_defaults(func=_sweep)

    ui = commands.add_parser("ui", help="open the MLflow UI on the project's store (mlruns/)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, this machine only)")
    ui.add_argument("--port", type=port_number, default=5000)
    ui.set_defaults(func=_ui)

    sync = commands.add_parser("sync", help="deliver MLflow records an outage of the tracking server spooled")
    sync.add_argument("spool", nargs="?", help="a spool folder (default: ganpipe-spool in ray.storage_path)")
    sync.add_argument("--timeout", type=float, default=0.0, help="keep retrying this many seconds (default: once)")
    sync.set_defaults(func=_sync)

    for name, help_text in [("sample", "write a PNG grid of generated images"),
                            ("evaluate", "print a generator's quality metrics next to the floor")]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--dataset", required=True, choices=DATASETS)
        source = sub.add_mutually_exclusive_group()
        source.add_argument("--checkpoint", help="generator.pt or checkpoint.pt (default: models/<dataset>/generator.pt)")
        source.add_argument("--mlflow-run", help="an MLflow run id whose logged generator to use")
        sub.add_argument("-n", type=positive_int, default=64 if name == "sample" else 10_000, help="number of samples")
        sub.add_argument("--seed", type=int, default=0)
        if name == "sample":
            sub.add_argument("-o", "--output", default="samples.png")
            classes = sub.add_mutually_exclusive_group()  # for a class-conditional generator
            classes.add_argument("--label", help="draw only this class: its index or name (e.g. 7, Sneaker)")
            classes.add_argument("--per-class", type=positive_int, metavar="K",
                                 help="a grid of K samples per class, one row each")
        sub.set_defaults(func=_tool(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except _user_errors() as err:
        if args.debug:
            traceback.print_exc()
        print(f"ganpipe {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
