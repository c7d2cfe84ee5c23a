"""Human approval before production: the DAG's ``approve_promotion`` task, after ``serve``.

A blessed package is only a candidate; a person decides whether it goes to the cars. ``ApprovePromotion`` is
an Airflow 3 human-in-the-loop operator (``airflow.providers.standard.operators.hitl.HITLOperator``): the task
waits in ``awaiting_input`` and the *Required actions* page of the UI (or the HITL REST API) answers it.

* **What is offered**: only a succeeded package whose model evaluation blessed, and only once: a package that
  is already production (a re-run day is a cache hit) is not asked about again. A backfill run never promotes
  (it rebuilds past days; their models are not candidates for today's cars). Those cases skip the task.
* **The request** names the package and what it would replace and shows its model card (the card's
  "Comparison with production" is the evaluation's comparison on the same test frames) and where the card's
  HTML page is (the UI's Markdown drops ``file://`` links), with a ``reason`` field. The choices:
  - ``Promote``: ``registry.promote`` makes it production as ``<serve.namespace>/<name>/1.N``, by the person
    who answered;
  - ``Reject``: an event on the package in the registry with who and why; production is unchanged;
  - no answer within ``serve.approval_timeout_s`` (the run's config): an event saying so, the task is skipped,
    production is unchanged.
* **auto_promote** (DAG param, default false): promote a blessed package at once, for teams that gate on
  metrics alone.

Rollback stays a command: ``avp registry rollback <namespace>/<name>``. The decision logic (``offer``,
``decide``, ``time_out``) is plain Python over the registry, shared by the operator and its tests.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Mapping

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param

from pipeline.config import PipelineConfig

PROMOTE, REJECT = "Promote", "Reject"
# The approval form's field: why (recorded in the registry beside who answered).
REASON = "reason"


def _registry(cfg: PipelineConfig):
    from pipeline.registry import Registry

    return Registry.open(cfg)


def offer(cfg: PipelineConfig, package: str, run_type: str = "manual") -> tuple[str | None, Any]:
    """(why the package is not offered for approval, or None; its registry record)."""
    if not package:  # serve returned nothing (marked success by hand, e.g. `airflow dags test --mark-success-pattern`)
        return "serve reported no package: nothing to offer for production", None
    registry = _registry(cfg)
    art = registry.get(package)
    if art.kind != "package" or art.state != "succeeded":
        return f"{art.ref} is a {art.state} {art.kind}; only a succeeded package can be promoted", art
    if not registry._is_blessed(art):
        return f"{art.ref} is not blessed by evaluation; it cannot be offered for production", art
    current = registry.production(cfg.serve.namespace, art.name)
    if current is not None and current.artifact_id == art.id:
        return f"{art.ref} is already production as {current.label}; nothing to decide", art
    if run_type == "backfill":
        return f"backfill runs rebuild past days and never promote; {art.ref} is not offered", art
    return None, art


def request(cfg: PipelineConfig, package: str) -> tuple[str, str]:
    """The approval request's subject and Markdown body: what changes, the model card and its link."""
    from serving.entry import package_paths
    from serving.package import MODEL_CARD, MODEL_CARD_HTML

    registry = _registry(cfg)
    art = registry.get(package)
    current = registry.production(cfg.serve.namespace, art.name)
    folder, _tarball = package_paths(art)
    replaces = (f"replacing **{current.label}** ({registry.get(current.artifact_id).ref})" if current else
                f"the first production version of {cfg.serve.namespace}/{art.name}")
    with open(os.path.join(folder, MODEL_CARD), encoding="utf-8") as fh:
        card = fh.read()
    body = "\n".join([
        f"**{art.ref}** (model {art.meta.get('model')}, blessed) would become production, {replaces}.", "",
        # The card itself, below: the UI's Markdown drops file:// links, and the package is on the pipeline's
        # storage, not behind the Airflow UI.
        f"Model card: shown below; as a page: `{os.path.join(folder, MODEL_CARD_HTML)}`.", "",
        f"*{PROMOTE}* promotes it; *{REJECT}* keeps production as it is. Either way, say why in *{REASON}*: "
        "it is recorded in the registry with your name.", "", "---", "", card])
    return f"Promote {art.ref} to production ({cfg.serve.namespace}/{art.name})?", body


def promote(cfg: PipelineConfig, package: str, by: str) -> dict[str, Any]:
    """Make the package production as ``<serve.namespace>/<name>/1.N``, by ``by``."""
    registry = _registry(cfg)
    art = registry.get(package)
    promotion = registry.promote(art.id, cfg.serve.namespace, art.name, by=by)
    print(f"{art.ref} is now production as {promotion.label} (by {by})")
    return {"decision": "promoted", "package": art.ref, "production": promotion.label, "by": by}


def decide(cfg: PipelineConfig, package: str, choice: str, by: str, reason: str = "") -> dict[str, Any]:
    """Carry out a person's answer: ``PROMOTE`` promotes, ``REJECT`` records who and why on the package."""
    if choice == PROMOTE:
        result = promote(cfg, package, by)
        if reason:
            _registry(cfg).note(package, f"promotion approved: {reason}", by=by)
        return result
    if choice != REJECT:
        raise ValueError(f"approve_promotion: unknown choice {choice!r}; the choices are {PROMOTE}, {REJECT}")
    registry = _registry(cfg)
    art = registry.note(package, f"promotion rejected: {reason or 'no reason given'}", by=by)
    current = registry.production(cfg.serve.namespace, art.name)
    print(f"{art.ref} was rejected by {by}: {reason or 'no reason given'}; production stays "
          f"{current.label if current else 'empty'}")
    return {"decision": "rejected", "package": art.ref, "production": current.label if current else None,
            "by": by, "reason": reason}


def time_out(cfg: PipelineConfig, package: str) -> str:
    """Record that nobody answered within ``serve.approval_timeout_s``; returns the message."""
    message = (f"no decision within serve.approval_timeout_s={cfg.serve.approval_timeout_s} s: "
               "not promoted, production unchanged")
    _registry(cfg).note(package, f"promotion request timed out: {message}", by="airflow")
    return f"{package}: {message}"


def responder(event: Mapping[str, Any]) -> str:
    """Who answered a HITL request (the UI user's name, else id)."""
    user = event.get("responded_by_user") or {}
    return str(user.get("name") or user.get("id") or "unknown")


class ApprovePromotion(HITLOperator):
    """Wait for a person to promote (or reject) the package ``serve`` built; see ``pipeline.approval``."""

    template_fields = (*HITLOperator.template_fields, "package")

    def __init__(self, *, package: Any, params: Any = None, **kwargs: Any) -> None:
        # ``params`` arrive as the DAG's (Airflow's defaults); the approval form shows only its own field,
        # and the task still sees the DAG's params in its context.
        form = {REASON: Param("", type="string", description="why (recorded in the registry)", source="task")}
        super().__init__(subject="Promote the new package to production?", options=[PROMOTE, REJECT],
                         params=form, **kwargs)
        self.package = package

    @staticmethod
    def _config(context: Any) -> PipelineConfig:
        from pipeline.orchestration import run_config

        # the task's own form field (``reason``) is among its params, beside the DAG's: not a config override
        return run_config({k: v for k, v in context["params"].items() if k != REASON})

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        cfg = self._config(context)
        run_type = context["dag_run"].run_type
        why_not, art = offer(cfg, self.package, str(getattr(run_type, "value", run_type)))
        if why_not:
            raise AirflowSkipException(why_not)
        if context["params"].get("auto_promote"):
            return promote(cfg, art.ref, by=f"auto_promote ({context['dag_run'].run_id})")
        self.subject, self.body = request(cfg, art.ref)
        self.response_timeout = dt.timedelta(seconds=cfg.serve.approval_timeout_s)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        cfg = self._config(context)
        if event.get("error_type") == "timeout":
            raise AirflowSkipException(time_out(cfg, self.package))
        answer = super().execute_complete(context, event)
        return decide(cfg, self.package, answer["chosen_options"][0], responder(answer),
                      str((answer.get("params_input") or {}).get(REASON) or ""))
