"""``avp``: the command line for every stage and the registry.

The stage subcommands are built from the stage specs (``pipeline.stages.STAGES``): each flag sets a config
field and takes its help from that field's comment; the command then calls ``pipeline.stages.invoke``,
the same function the Airflow DAG calls. Bad input exits 2 with one line saying what is wrong; a stage
whose verdict is 'no' (validation failed, model not blessed) exits 1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any, Sequence

from pipeline import __version__, stages
from pipeline import config as config_mod
from pipeline.errors import StageFailed, UserError


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
    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("--remote", metavar="URL", help="use the registry API at URL (avp registry serve, or "
                        "Airflow's /avp) instead of a local database; token: $AVP_REGISTRY_TOKEN")
    rsub.add_parser("serve", help="serve the registry API and pages (registry.api_host:api_port; token from "
                    "$AVP_REGISTRY_TOKEN)", parents=[common])
    p = rsub.add_parser("list", help="list artifacts", parents=[remote])
    p.add_argument("--kind")
    p.add_argument("--name")
    p.add_argument("--state")
    p = rsub.add_parser("show", help="one artifact in full", parents=[remote])
    p.add_argument("ref", help="kind:name@vN, kind:name (latest succeeded) or an id")
    p = rsub.add_parser("lineage", help="everything upstream (default) or downstream", parents=[remote])
    p.add_argument("ref")
    p.add_argument("--down", action="store_true", help="downstream instead of upstream")
    p = rsub.add_parser("promote", help="make a blessed model/package production", parents=[remote])
    p.add_argument("ref")
    p.add_argument("--namespace", default=None, help="default: serve.namespace")
    p.add_argument("--as", dest="as_name", default=None, help="promotion name (default: artifact name)")
    p.add_argument("--major", type=int, default=1)
    p = rsub.add_parser("rollback", help="restore the previous production version", parents=[remote])
    p.add_argument("target", help="namespace/name")
    for action in ("deprecate", "end-of-life"):
        p = rsub.add_parser(action, help=f"mark a succeeded artifact {action.replace('-', ' ')}", parents=[remote])
        p.add_argument("ref")
        p.add_argument("--reason", default="")
        p.add_argument("--production", action="store_true",
                       help="also when it is production: production rolls back to the previous succeeded version")
    rsub.add_parser("promotions", help="list promotions", parents=[remote])

    for spec in stages.STAGES.values():
        _add_spec(sub, spec, common)
    return parser


def _add_spec(sub: Any, spec: stages.StageSpec, common: argparse.ArgumentParser) -> None:
    """One subcommand from a stage spec: its config flags (help: the field's comment), then its inputs."""
    p = sub.add_parser(spec.name, help=spec.help, parents=[common])
    for flag, fields in spec.flag_fields():
        doc = config_mod.describe(fields[0])
        metavar = tuple(f.rpartition(".")[2].upper() for f in fields)
        if doc.annotation is bool:
            p.add_argument(flag.flag_name(), dest=_dest(fields[0]), action="store_const", const=True, default=None,
                           help=doc.summary())
        elif len(fields) > 1:  # one flag, several fields: --source SOURCE SOURCE_PATH
            p.add_argument(flag.flag_name(), dest=_dest(fields[0]), default=None, help=doc.summary(),
                           nargs=len(fields), metavar=metavar)
        else:
            p.add_argument(flag.flag_name(), dest=_dest(fields[0]), default=None, help=doc.summary(),
                           metavar=metavar[0])
    for item in spec.inputs:
        if item.switch:
            p.add_argument(item.flag_name(), dest=_input_dest(item.name), action="store_const", const=True,
                           default=None, help=item.help)
        else:
            p.add_argument(item.flag_name(), dest=_input_dest(item.name), default=None, required=item.required,
                           metavar=item.name.upper(), help=item.help)


def _dest(field: str) -> str:
    return "set:" + field


def _input_dest(name: str) -> str:
    return "input:" + name


def _load_config(args: argparse.Namespace) -> config_mod.PipelineConfig:
    overrides: dict[str, Any] = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "registry_url", None):
        overrides["registry_url"] = args.registry_url
    if args.command in stages.STAGES:
        for _flag, fields in stages.STAGES[args.command].flag_fields():
            value = getattr(args, _dest(fields[0]))
            if value is not None:
                overrides.update(zip(fields, value) if len(fields) > 1 else [(fields[0], value)])
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
    spec = stages.STAGES[args.command]
    inputs = {item.name: getattr(args, _input_dest(item.name)) for item in spec.inputs
              if getattr(args, _input_dest(item.name)) is not None}
    if not spec.produces:
        return stages.run_command(spec.name, cfg, say=ui.say, **inputs)
    result = stages.invoke(spec.name, cfg, say=ui.say, **inputs)
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
