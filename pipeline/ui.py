"""Terminal output: messages, progress bars and readable tables (rich)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.errors import UserError

console = Console(highlight=False, soft_wrap=True)
T = TypeVar("T")


def say(message: str) -> None:
    console.print(message, markup=False)


def progress(items: Iterable[T], total: int | None = None, description: str = "working") -> Iterator[T]:
    """A progress bar over ``items`` when stdout is a terminal; plain iteration otherwise."""
    if not console.is_terminal:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    out = Table(title=title, title_justify="left")
    for col in columns:
        out.add_column(col)
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row))
    console.print(out)


def print_result(stage: str, result: dict[str, Any]) -> None:
    """Every stage returns a dict; its optional ``tables`` are printed, the rest as key: value lines."""
    for title, columns, rows in result.get("tables", []):
        table(title, columns, rows)
    for key, value in result.items():
        if key != "tables":
            console.print(f"[bold]{key}[/bold]: {value}")


def _artifact_rows(arts) -> list[list[Any]]:
    return [[a.id, a.kind, a.name, f"v{a.version}", a.state,
             "" if a.blessed is None else ("yes" if a.blessed else "no"),
             a.content_key[:12], a.git_sha[:10] + ("+dirty" if a.diff_hash else ""),
             a.created_at.strftime("%Y-%m-%d %H:%M:%S")] for a in arts]


_ARTIFACT_COLUMNS = ["id", "kind", "name", "version", "state", "blessed", "content key", "code", "created (UTC)"]


def registry_command(cfg, args: argparse.Namespace) -> int:
    from pipeline import registry_api
    from pipeline.registry import Registry

    action = args.action
    if action == "serve":
        return registry_api.serve(cfg)
    registry = registry_api.remote_registry(args.remote, cfg) if args.remote else Registry.open(cfg)
    if action == "list":
        table(f"artifacts in {registry.url}", _ARTIFACT_COLUMNS,
              _artifact_rows(registry.list(args.kind, args.name, args.state)))
    elif action == "show":
        art = registry.get(args.ref)
        record = {k: v for k, v in vars(art).items() if k != "cached"}
        record["parents"] = [p.ref for p in registry.parents(art.id)]
        record["children"] = [c.ref for c in registry.children(art.id)]
        record["events"] = [f"{e['at']:%Y-%m-%d %H:%M:%S} {e['from_state']} -> {e['to_state']} {e['reason']}"
                            for e in registry.events(art.id)]
        console.print_json(json.dumps(record, default=str))
    elif action == "lineage":
        art = registry.get(args.ref)
        direction = "down" if args.down else "up"
        rows = [[depth, a.ref, a.state, a.location] for depth, a in registry.lineage(art.id, direction)]
        table(f"{'downstream' if args.down else 'upstream'} of {art.ref}", ["depth", "artifact", "state", "location"],
              rows)
    elif action == "promote":
        art = registry.get(args.ref)
        promo = registry.promote(art.id, args.namespace or cfg.serve.namespace, args.as_name or art.name, args.major)
        say(f"{art.ref} is now production as {promo.label}")
    elif action == "rollback":
        namespace, sep, name = args.target.partition("/")
        if not sep:
            raise UserError(f"rollback expects namespace/name, got {args.target!r}")
        promo = registry.rollback(namespace, name)
        say(f"rolled back: {promo.label} ({registry.get(promo.artifact_id).ref}) is production again")
    elif action in ("deprecate", "end-of-life"):
        state = "deprecated" if action == "deprecate" else "end_of_life"
        serving = registry.production_of(registry.get(args.ref).id)
        art = registry.transition(args.ref, state, args.reason, production=args.production)
        say(f"{art.ref} is now {art.state}")
        for old in serving:
            now = registry.production(old.namespace, old.name)
            say(f"production of {old.namespace}/{old.name} is now "
                + (f"{now.label} ({registry.get(now.artifact_id).ref})" if now else "none: promote a version"))
    elif action == "promotions":
        table("promotions", ["version", "artifact", "status", "promoted (UTC)", "by"],
              [[p.label, registry.get(p.artifact_id).ref, p.status, f"{p.promoted_at:%Y-%m-%d %H:%M:%S}",
                p.promoted_by] for p in registry.promotions()])
    return 0


