"""``avp``: the command line for every stage and the registry.

Each stage subcommand maps its flags onto config fields, then calls ``pipeline.stages.invoke`` - the
same function the Airflow DAG calls. Bad input exits 2 with one line saying what is wrong; a stage
whose verdict is 'no' (validation failed, model not blessed) exits 1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any, Sequence

from pipeline import __version__
from pipeline import config as config_mod
from pipeline.errors import StageFailed, UserError

# stage -> [(flag, config field, help)], the flags each stage subcommand offers on top of --set.
STAGE_FLAGS: dict[str, list[tuple[str, str, str]]] = {
    "simulate": [
        ("--logs", "simulate.logs", "number of drive logs"),
        ("--frames", "simulate.frames", "frames per log (10 Hz)"),
        ("--days", "simulate.days", "spread the logs over this many days"),
        ("--start-date", "simulate.start_date", "first day, YYYY-MM-DD"),
        ("--seed", "simulate.seed", "random seed (same seed, same bytes)"),
    ],
    "ingest": [
        ("--split", "ingest.split", "hash (stable per log id) or geo (GeoSplit cells)"),
        ("--date-from", "ingest.date_from", "first day of logs to select, YYYY-MM-DD (inclusive)"),
        ("--date-to", "ingest.date_to", "last day, YYYY-MM-DD (exclusive)"),
        ("--spark-master", "ingest.spark_master", "Spark master URL, e.g. local[2] or spark://host:7077"),
        ("--name", "ingest.dataset_name", "dataset name in the registry"),
    ],
}
STAGE_FLAGS["validate"] = [
    ("--warn-only", "validate.warn_only", "report failed expectations but do not stop (exploration)"),
]
STAGE_HELP = {
    "simulate": "write deterministic simulated fleet drive logs (MCAP) into the pipeline home",
    "ingest": "extract drive logs into Petastorm train/test/val datasets with Spark",
    "validate": "check a dataset with Great Expectations (distributions, drift) and gate training",
}
# stage -> [(flag, input name, help)]: artifact references and switches passed to the entry function.
STAGE_INPUTS: dict[str, list[tuple[str, str, str]]] = {
    "validate": [("--dataset", "dataset", "dataset reference or version (default: the latest)")],
}
BOOLEAN_FLAGS = {"--warn-only"}
STAGE_FLAGS["train"] = [
    ("--backend", "train.backend", "horovod (horovodrun --gloo) or ddp (torchrun)"),
    ("--np", "train.np", "number of training processes (ranks), each reading its own shard"),
    ("--epochs", "train.epochs", "passes over the train split"),
    ("--model", "train.model", "registered model name (see training/models)"),
    ("--batch-size", "train.batch_size", "frames per rank per step"),
]
STAGE_HELP["train"] = "train a LiDAR segmentation model on a validated dataset (Horovod or DDP, N processes)"
STAGE_INPUTS["train"] = [
    ("--dataset", "dataset", "dataset reference or version (default: the latest)"),
    ("--resume", "resume", "continue from the newest checkpoint of this training request"),
]
BOOLEAN_FLAGS.add("--resume")
STAGE_FLAGS["evaluate"] = [
    ("--latency-runs", "evaluate.latency_runs", "timed calls per variant (eager, TorchScript, exported)"),
    ("--min-miou", "evaluate.min_miou", "blessing: the lowest acceptable test mIoU"),
    ("--max-regression", "evaluate.max_regression", "blessing: the most a class or scene may lose against production"),
    ("--device", "evaluate.device", "auto, cpu or cuda (where the model is scored and timed)"),
]
STAGE_HELP["evaluate"] = "model, system and hardware metrics on the test split, a report, and the blessing verdict"
STAGE_INPUTS["evaluate"] = [("--model", "model", "model reference or version (default: the latest)")]
STAGE_FLAGS["serve"] = [
    ("--example-points", "serve.example_points", "points in the packaged example cloud (latency is measured on it)"),
    ("--max-points", "serve.max_points", "largest cloud the exported model.pt2 and the server accept"),
]
STAGE_HELP["serve"] = ("package a blessed model (TorchScript + AOTInductor .pt2 + metadata + manifest) for the C++ "
                       "consumer and the HTTP server")
STAGE_INPUTS["serve"] = [("--model", "model", "model reference or version (default: the latest)")]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage; keep it to one clear line
        raise UserError(f"{self.prog}: {message}")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="pipeline home (default ./.avp, or AVP_HOME)")
    common.add_argument("--registry-url", help="SQLAlchemy URL of the registry (default: SQLite in the home)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set train.lr=0.001")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="avp", description="Fleet drive logs to a deployable LiDAR perception model.")
    parser.add_argument("--version", action="version", version=f"avp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    cfg = sub.add_parser("config", help="show the fully resolved config", parents=[common])
    cfg.add_argument("action", choices=["show"])

    reg = sub.add_parser("registry", help="inspect and manage versioned artifacts")
    rsub = reg.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    p = rsub.add_parser("list", help="list artifacts", parents=[common])
    p.add_argument("--kind")
    p.add_argument("--name")
    p.add_argument("--state")
    p = rsub.add_parser("show", help="one artifact in full", parents=[common])
    p.add_argument("ref", help="kind:name@vN, kind:name (latest succeeded) or an id")
    p = rsub.add_parser("lineage", help="everything upstream (default) or downstream", parents=[common])
    p.add_argument("ref")
    p.add_argument("--down", action="store_true", help="downstream instead of upstream")
    p = rsub.add_parser("promote", help="make a blessed model/package production", parents=[common])
    p.add_argument("ref")
    p.add_argument("--namespace", default=None, help="default: serve.namespace")
    p.add_argument("--as", dest="as_name", default=None, help="promotion name (default: artifact name)")
    p.add_argument("--major", type=int, default=1)
    p = rsub.add_parser("rollback", help="restore the previous production version", parents=[common])
    p.add_argument("target", help="namespace/name")
    for action in ("deprecate", "end-of-life"):
        p = rsub.add_parser(action, help=f"mark a succeeded artifact {action.replace('-', ' ')}", parents=[common])
        p.add_argument("ref")
        p.add_argument("--reason", default="")
    rsub.add_parser("promotions", help="list promotions", parents=[common])

    p = sub.add_parser("serve-http", help="serve a package over HTTP (POST /v1/segment, /healthz, /metadata)",
                       parents=[common])
    p.add_argument("--package", required=True,
                   help="package folder or .tar.gz, package:NAME@vN, or NAMESPACE/NAME (its production package)")
    p.add_argument("--host", default=None, help="address to bind (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")

    for stage, flags in STAGE_FLAGS.items():
        p = sub.add_parser(stage, help=STAGE_HELP[stage], parents=[common])
        for flag, _field, text in flags:
            if flag in BOOLEAN_FLAGS:
                p.add_argument(flag, dest=_dest(flag), action="store_const", const="true", default=None, help=text)
            else:
                p.add_argument(flag, dest=_dest(flag), default=None, help=text)
        for flag, name, text in STAGE_INPUTS.get(stage, []):
            if flag in BOOLEAN_FLAGS:
                p.add_argument(flag, dest="input_" + name, action="store_const", const=True, default=None, help=text)
            else:
                p.add_argument(flag, dest="input_" + name, default=None, help=text)
        p.add_argument("--force", action="store_true", help="rebuild even if a cached artifact matches")
        if stage == "ingest":
            p.add_argument("--source", nargs=2, metavar=("KIND", "PATH"), default=None,
                           help="import a real dataset: kitti|semantickitti|av2|mcap PATH")
    return parser


def _dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def _load_config(args: argparse.Namespace) -> config_mod.PipelineConfig:
    overrides: dict[str, Any] = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "registry_url", None):
        overrides["registry_url"] = args.registry_url
    for flag, field, _text in STAGE_FLAGS.get(args.command, []):
        value = getattr(args, _dest(flag), None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "force", False):
        overrides["force"] = True
    if getattr(args, "source", None):
        overrides["ingest.source"], overrides["ingest.source_path"] = args.source
    overrides.update(config_mod.parse_assignments(getattr(args, "set", [])))
    return config_mod.load(overrides)


def _run(args: argparse.Namespace) -> int:
    from pipeline import ui  # rich is imported only when something is printed

    if args.command is None:
        build_parser().print_help()
        return 2
    cfg = _load_config(args)
    if args.command == "config":
        print(json.dumps(config_mod.resolved(cfg), indent=2))
        return 0
    if args.command == "registry":
        return ui.registry_command(cfg, args)
    if args.command == "serve-http":
        from serving.http import serve

        return serve(cfg, args.package, host=args.host, port=args.port, say=ui.say)
    from pipeline import stages

    inputs = {name: getattr(args, "input_" + name) for _flag, name, _text in STAGE_INPUTS.get(args.command, [])
              if getattr(args, "input_" + name) is not None}
    result = stages.invoke(args.command, cfg, say=ui.say, **inputs)
    ui.print_result(args.command, result)
    if result.get("blessed") is False:  # evaluate's verdict: printed above, and a non-zero exit for scripts
        print(f"avp: {result.get('ref', 'model')} is not blessed", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (a preempted node, Airflow killing a task) becomes SystemExit, so an in-flight build is
    # marked aborted instead of being left as 'building'.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from pipeline.home import UnsafeNameError
    from pipeline.registry import RegistryError

    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except (UserError, config_mod.ConfigError, RegistryError, UnsafeNameError) as exc:
        print(f"avp: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"avp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("avp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
