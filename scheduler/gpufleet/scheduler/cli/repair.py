"""`gpufleet repair approve|skip|cancel|list` and `gpufleet nodes history NODE`, and the
controller's repair options. Parses, then delegates to gpufleet.scheduler.repair.

The admin commands write requests into the controller's repair journal (on the head node,
like --db) and the controller picks them up on its next tick; `history` merges the journal
with the store's actions and events into one timeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from gpufleet.rpc.settings import FiniteRange
from gpufleet.scheduler.repair.catalog import Resolution
from gpufleet.scheduler.repair.engine import OPEN, POLICIES, RepairConfig, Step
from gpufleet.scheduler.repair.journal import Journal, JournalError

DEFAULT_JOURNAL = "/var/lib/gpufleet/repair.jsonl"
CLASSES = (Resolution.RESET_GPU.value, Resolution.REBOOT.value, Resolution.NONE.value)

journal_option = click.option(
    "--repair-journal", default=DEFAULT_JOURNAL, show_default=True,
    envvar="GPUFLEET_REPAIR_JOURNAL", type=click.Path(dir_okay=False),
    help="the controller's repair journal (JSON lines)")


def repair_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The `controller` command's repair options and its alert destinations (names as in
    controller.toml)."""
    options = [
        click.option("--repair/--no-repair", "repair", default=False, show_default=True,
                     help="remediate, diagnose and resume (or escalate) nodes gpufleet "
                     "drained (needs --slurm cli for scontrol reboot)"),
        journal_option,
        click.option("--repair-policy", multiple=True, metavar="CLASS=POLICY",
                     help=f"per class ({', '.join(CLASSES)}): auto, ask or never; repeat "
                     "[default: auto for all; contact_support is never retried]"),
        click.option("--repair-max-per-partition", type=click.IntRange(1), default=1,
                     show_default=True, help="nodes of one partition in remediation at once"),
        click.option("--repair-fail-limit", type=click.IntRange(1), default=3,
                     show_default=True, help="failures within the window that quarantine"),
        click.option("--repair-fail-window-s", type=click.FloatRange(1), default=7 * 86400.0,
                     show_default=True, help="the quarantine window"),
        click.option("--repair-diag-level", type=click.IntRange(1, 3), default=1,
                     show_default=True, help="gpufleet-agent diag --level before resume"),
        click.option("--repair-shadow", is_flag=True,
                     help="record what the repair loop would do; do nothing (also on with "
                     "--shadow)"),
        click.option("--routine-diag-every-s", type=FiniteRange(0, 366 * 86400), default=0.0,
                     show_default=True,
                     help="diagnose each idle node at most once per this period (with "
                     "--repair; 0: no routine diagnostics)"),
        click.option("--routine-diag-idle-s", type=FiniteRange(0, 366 * 86400), default=3600.0,
                     show_default=True,
                     help="only nodes idle in Slurm at least this long (LastBusyTime)"),
        click.option("--routine-diag-batch", type=click.IntRange(1), default=1,
                     show_default=True,
                     help="nodes of one partition in a routine diagnostic at once (within "
                     "--repair-max-per-partition)"),
        click.option("--routine-diag-level", type=click.IntRange(1, 3), default=1,
                     show_default=True, help="gpufleet-agent diag --level for routine checks"),
        click.option("--routine-diag-timeout-s", type=FiniteRange(1, 86400), default=600.0,
                     show_default=True,
                     help="a node is never held out of scheduling longer than this"),
        click.option("--alertmanager-url", envvar="GPUFLEET_ALERTMANAGER_URL",
                     help="Alertmanager base URL (http://HOST:9093): the controller's own "
                     "alerts (node fatal, node silent) and repair escalations go there"),
        click.option("--alert-webhook-url", envvar="GPUFLEET_ALERT_WEBHOOK_URL",
                     help="also post those alerts to this chat webhook ({\"text\": ...})"),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def parse_policy(items: Iterable[str]) -> dict[str, str]:
    out = dict.fromkeys(CLASSES, "auto")
    for item in items:
        cls, sep, pol = item.partition("=")
        if not sep or cls.strip() not in CLASSES or pol.strip() not in POLICIES:
            raise click.BadParameter(
                f"{item!r}: use CLASS=POLICY with CLASS one of {', '.join(CLASSES)} and POLICY "
                f"one of {', '.join(POLICIES)}", param_hint="--repair-policy")
        out[cls.strip()] = pol.strip()
    return out


def repair_config(opts: dict[str, Any]) -> RepairConfig | None:
    """Pop the repair options from the controller's keyword arguments; None when off."""
    on = opts.pop("repair")
    cfg = RepairConfig(
        shadow=opts.pop("repair_shadow"), policy=parse_policy(opts.pop("repair_policy")),
        max_per_partition=opts.pop("repair_max_per_partition"),
        fail_limit=opts.pop("repair_fail_limit"),
        fail_window_s=opts.pop("repair_fail_window_s"),
        diag_level=opts.pop("repair_diag_level"),
        routine_every_s=opts.pop("routine_diag_every_s"),
        routine_idle_s=opts.pop("routine_diag_idle_s"),
        routine_batch=opts.pop("routine_diag_batch"),
        routine_level=opts.pop("routine_diag_level"),
        routine_timeout_s=opts.pop("routine_diag_timeout_s"))
    if cfg.routine_every_s > 0 and not on:
        raise click.UsageError("--routine-diag-every-s needs --repair (routine diagnostics "
                               "run in the repair loop)")
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    return cfg if on else None


def alert_sender(opts: dict[str, Any]) -> Any:
    am, hook = opts.pop("alertmanager_url"), opts.pop("alert_webhook_url")
    if not am and not hook:
        return None
    from urllib.parse import urlsplit

    for flag, url in (("--alertmanager-url", am), ("--alert-webhook-url", hook)):
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise click.BadParameter(f"{url!r}: want http(s)://HOST:PORT", param_hint=flag)
    from gpufleet.scheduler.observability.alerting import AlertSender

    return AlertSender(am or None, hook or None)


# ---------------------------------------------------------------- admin commands


@click.group("repair")
def repair_group() -> None:
    """The repair loop: approve, skip or cancel a node's pending step; list open repairs."""


def _request(action: str, node: str, journal: str, note: str) -> None:
    from gpufleet.scheduler.health.admin import caller_name
    from gpufleet.scheduler.slurm import SlurmError, check_node_name

    try:
        check_node_name(node)
    except SlurmError as e:
        raise click.BadParameter(str(e), param_hint="NODE") from e
    if not Path(journal).exists():
        raise click.ClickException(f"no repair journal at {journal}: is the controller running "
                                   "with --repair (or pass --repair-journal)?")
    try:
        rec = Journal(journal).request(node, action, caller_name(), note)
    except JournalError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{action} {node}: requested (id {rec['id']}); the controller acts on its "
               "next tick")


def _admin_command(action: str, doc: str) -> None:
    @repair_group.command(action, help=doc)
    @click.argument("node")
    @journal_option
    @click.option("--note", default="", help="why (kept in the journal)")
    def cmd(node: str, repair_journal: str, note: str) -> None:
        _request(action, node, repair_journal, note)


_admin_command("approve", "Run NODE's pending remediation (policy 'ask'), or lift its "
               "quarantine and try once more.")
_admin_command("skip", "Skip NODE's remediation: diagnose it, then resume or escalate.")
_admin_command("cancel", "Stop repairing NODE: it stays drained for a person.")


def _latest(journal: Journal) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for r in journal.records():
        if r.get("type") == "step" and r.get("step") in {s.value for s in Step}:
            last[str(r["node"])] = r
    return last


@repair_group.command("list")
@journal_option
@click.option("--all", "show_all", is_flag=True, help="also closed repairs (latest per node)")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(repair_journal: str, show_all: bool, as_json: bool) -> None:
    """Nodes in repair now (waiting, approval, remediating, diagnosing)."""
    try:
        latest = _latest(Journal(repair_journal))
    except JournalError as e:
        raise click.ClickException(str(e)) from e
    rows = [r for r in latest.values() if show_all or r["step"] in {s.value for s in OPEN}]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in sorted(rows, key=lambda r: r["node"]):
        what = "routine-diag" if r.get("routine") else r.get("resolution", "")
        click.echo(f"{r['node']:<16} {r['step']:<12} {what:<16} "
                   f"{_when(r['ts_ms'])}  {r.get('detail', '')}")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def history_rows(node: str, journal: Journal, store: Any) -> list[dict[str, Any]]:
    """fault -> drain -> remediation -> diag -> resume, from the store and the journal."""
    rows: list[dict[str, Any]] = []
    if store is not None:
        for e in store.events(since_ms=0, node=node):
            rows.append({"ts_ms": e.ts_ms, "what": f"event {e.kind.lower()}",
                         "detail": f"{e.reason_code} {e.evidence}".strip()})
        for a in store.actions(node):
            rows.append({"ts_ms": a.done_ms or a.created_ms, "what": f"{a.action} ({a.status})",
                         "detail": f"{a.reason} [{a.actor}] {a.detail}".strip()})
    for r in journal.history(node):
        kind = r.get("type")
        if kind == "step":
            what = f"repair {r.get('step')}"
            detail = r.get("detail", "")
            if r.get("evidence"):
                detail += f" | evidence: {r['evidence']}"
        elif kind == "request":
            what, detail = f"request {r.get('action')}", f"by {r.get('actor')} {r.get('note', '')}"
        else:
            what, detail = f"{r.get('action')} handled", str(r.get("result", ""))
        rows.append({"ts_ms": r["ts_ms"], "what": what, "detail": str(detail).strip()})
    rows.sort(key=lambda r: r["ts_ms"])
    return rows


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def nodes_history_command(open_store: Callable[[str], Any], db_option: Decorator
                          ) -> click.Command:
    @click.command("history")
    @click.argument("node")
    @db_option
    @journal_option
    @click.option("--json", "as_json", is_flag=True)
    def history(node: str, db: str, repair_journal: str, as_json: bool) -> None:
        """NODE's timeline: fault -> drain -> remediation -> diag -> resume, with evidence."""
        store = open_store(db) if "://" in db or Path(db).exists() else None
        try:
            rows = history_rows(node, Journal(repair_journal), store)
        except JournalError as e:
            raise click.ClickException(str(e)) from e
        finally:
            if store is not None:
                store.close()
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo(f"{node}: no history")
            return
        t0 = rows[0]["ts_ms"]
        for r in rows:
            click.echo(f"{_when(r['ts_ms'])} +{(r['ts_ms'] - t0) / 1000:8.1f}s  "
                       f"{r['what']:<24} {r['detail']}")

    return history
