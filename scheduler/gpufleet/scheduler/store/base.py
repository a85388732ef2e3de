"""The SQL both backends share (rows in rows.py, the Protocols in protocols.py).

The domain logic (worst verdict wins, a new agent instance resets its verdicts, ...) is
written once in portable SQL with `?` placeholders; a backend supplies the connection, the
transaction and the placeholder style. Nothing here talks to Slurm or to agents.

One module (~430 lines): every statement both backends run sits in one class, so a change of
schema is read and reviewed in one place beside its migration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from .acct import AcctStoreMixin
from .relay import RelayStoreMixin
from .rows import (
    ActionRow,
    CheckpointRow,
    EventRow,
    HealthChangeRow,
    NodeRow,
    PolicyRow,
    RecoveryRow,
    StoreError,
    VerdictRow,
)

HEALTH_ORDER = {"unknown": 0, "ok": 1, "warn": 2, "degraded": 3, "fatal": 4}


def now_ms() -> int:
    return int(time.time() * 1000)


_NODE_COLUMNS = ("name, hostname, gpu_count, health, health_reason, health_evidence, "
                 "first_seen_ms, last_seen_ms, reachable, unreachable_since_ms")
_EVENT_COLUMNS = ("id, node, ts_ms, received_ms, kind, severity, reason_code, evidence, "
                  "gpu_index, xid")


def _node_row(r: Any) -> NodeRow:
    return NodeRow(name=r[0], hostname=r[1], gpu_count=r[2], health=r[3], health_reason=r[4],
                   health_evidence=r[5], first_seen_ms=r[6], last_seen_ms=r[7],
                   reachable=bool(r[8]), unreachable_since_ms=r[9])


def check_schema_version(version: int, known: int, target: str) -> None:
    """Refuse a store written by a newer gpufleet rather than guess at its schema."""
    if version > known:
        raise StoreError(
            f"store {target} has schema version {version}, newer than this gpufleet knows "
            f"({known}): upgrade gpufleet"
        )


class SqlStore(AcctStoreMixin, RelayStoreMixin):
    """The store's logic over one DB-API connection behind a lock (writes are short).

    Subclasses provide `_tx()` (a write transaction yielding something with `execute`),
    `_read()` (the same for reads), and `_FOR_UPDATE` (row locks where the dialect has them).
    Driver errors leave as StoreError naming the target (`self.target`).
    """

    _FOR_UPDATE = ""
    target = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # backend hooks -------------------------------------------------------------------------

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ schema

    def schema_version(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    # ------------------------------------------------------------ nodes

    def upsert_node(
        self, name: str, hostname: str, gpu_count: int, inventory: bytes, agent_instance: str,
        now_ms: int,
    ) -> None:
        with self._tx() as db:
            row = db.execute(
                "SELECT agent_instance FROM nodes WHERE name = ?" + self._FOR_UPDATE,  # noqa: S608 - constant
                (name,),
            ).fetchone()
            if row is not None and row[0] != agent_instance:
                # A new agent instance (restart, reboot) reports every verdict afresh in its
                # first samples; the record of past faults stays in events and actions.
                db.execute("DELETE FROM verdicts WHERE node = ?", (name,))
                db.execute("UPDATE nodes SET health = 'ok', health_reason = '', "
                           "health_evidence = '', last_seq = 0 WHERE name = ?", (name,))
            db.execute(
                """INSERT INTO nodes (name, hostname, gpu_count, agent_instance,
                                      health, last_seq, first_seen_ms, last_seen_ms)
                   VALUES (?, ?, ?, ?, 'ok', 0, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET
                     hostname=excluded.hostname, gpu_count=excluded.gpu_count,
                     last_seen_ms=excluded.last_seen_ms,
                     agent_instance=excluded.agent_instance""",
                (name, hostname, gpu_count, agent_instance, now_ms, now_ms),
            )
            # its own table (migration 11): the node's row stays narrow, so the last-seen
            # touches and the liveness scan never copy or read the ~2.2 KB inventory; an
            # agent reconnecting with the same inventory rewrites nothing
            db.execute(
                """INSERT INTO node_inventory (node, inventory) VALUES (?, ?)
                   ON CONFLICT(node) DO UPDATE SET inventory=excluded.inventory
                   WHERE node_inventory.inventory <> excluded.inventory""",
                (name, inventory),
            )

    def last_seq(self, name: str) -> tuple[str, int]:
        with self._read() as db:
            row = db.execute(
                "SELECT agent_instance, last_seq FROM nodes WHERE name = ?", (name,)
            ).fetchone()
        return (str(row[0]), int(row[1])) if row else ("", 0)

    def touch_node(self, name: str, agent_instance: str, seq: int, now_ms: int) -> None:
        with self._tx() as db:
            # CASE, not max()/GREATEST(): the one spelling both dialects share
            db.execute(
                "UPDATE nodes SET last_seen_ms = ?, "
                "last_seq = CASE WHEN last_seq > ? THEN last_seq ELSE ? END "
                "WHERE name = ? AND agent_instance = ?",
                (now_ms, seq, seq, name, agent_instance),
            )

    def touch_nodes(self, rows: Sequence[tuple[str, str, int, int]]) -> None:
        """touch_node for many nodes, (name, agent_instance, seq, now_ms) each, in ONE
        transaction. Neither time nor sequence ever moves back: a batch written from another
        thread may land after a report stored on its own."""
        if not rows:
            return
        sql = ("UPDATE nodes SET "
               "last_seen_ms = CASE WHEN last_seen_ms > ? THEN last_seen_ms ELSE ? END, "
               "last_seq = CASE WHEN last_seq > ? THEN last_seq ELSE ? END "
               "WHERE name = ? AND agent_instance = ?")
        with self._tx() as db:  # one statement, run per row by the driver, one commit
            db.executemany(sql, [(t, t, seq, seq, name, inst) for name, inst, seq, t in rows])

    def set_reachable(self, name: str, reachable: bool, now_ms: int) -> bool:
        """Mark a node (un)reachable; True when that changed it (False too for unknown nodes).

        `unreachable_since_ms` keeps the moment it first went silent, and is cleared when it
        comes back.
        """
        with self._tx() as db:
            cur = db.execute(
                "UPDATE nodes SET reachable = ?, unreachable_since_ms = ? "
                "WHERE name = ? AND reachable <> ?",
                (reachable, None if reachable else now_ms, name, reachable),
            )
            return bool(cur.rowcount > 0)

    def nodes(self) -> list[NodeRow]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name").fetchall()  # noqa: S608 - constant
        return [_node_row(r) for r in rows]

    def liveness_changes(self, silent_before_ms: int) -> list[NodeRow]:
        """The nodes whose reachability is due to change: reachable ones last seen before
        `silent_before_ms`, and unreachable ones seen since. The health policy asks this
        every second: the filter runs inside the database, so at 10,000 nodes it returns the
        few that changed, not 10,000 rows to sort through in Python."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_NODE_COLUMNS} FROM nodes "  # noqa: S608 - constant
                "WHERE (reachable = ? AND last_seen_ms < ?) "
                "OR (reachable = ? AND last_seen_ms >= ?) ORDER BY name",
                (True, silent_before_ms, False, silent_before_ms),
            ).fetchall()
        return [_node_row(r) for r in rows]

    def node(self, name: str) -> NodeRow | None:
        with self._read() as db:
            r = db.execute(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE name = ?", (name,)  # noqa: S608
            ).fetchone()
        return _node_row(r) if r else None

    def inventory(self, name: str) -> bytes | None:
        with self._read() as db:
            r = db.execute("SELECT inventory FROM node_inventory WHERE node = ?",
                           (name,)).fetchone()
        return bytes(r[0]) if r and r[0] is not None else None

    # ------------------------------------------------------------ verdicts

    def set_verdict(self, v: VerdictRow, *, publish: bool = False) -> tuple[str, str]:
        """Store a verdict; return the node's health (worst current verdict) before and after.

        `publish`: when the health moved, also queue the change in `health_changes`, in the
        same transaction, for the process that acts in Slurm (this one does not): a crash
        can lose neither the verdict without its change nor the change without the verdict."""
        gpu = -1 if v.gpu_index is None else v.gpu_index
        with self._tx() as db:
            # the row lock (PostgreSQL) serialises two writers of one node's verdicts
            before = db.execute(
                "SELECT health FROM nodes WHERE name = ?" + self._FOR_UPDATE,  # noqa: S608 - constant
                (v.node,),
            ).fetchone()
            if v.severity == "ok":
                db.execute(
                    "DELETE FROM verdicts WHERE node = ? AND check_name = ? AND gpu_index = ? "
                    "AND subject = ?",
                    (v.node, v.check_name, gpu, v.subject),
                )
            else:
                db.execute(
                    """INSERT INTO verdicts (node, check_name, gpu_index, subject, severity,
                                            reason_code, evidence, since_ms)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(node, check_name, gpu_index, subject) DO UPDATE SET
                         severity=excluded.severity, reason_code=excluded.reason_code,
                         evidence=excluded.evidence, since_ms=excluded.since_ms""",
                    (v.node, v.check_name, gpu, v.subject, v.severity, v.reason_code,
                     v.evidence, v.since_ms),
                )
            rows = db.execute(
                "SELECT severity, reason_code, evidence FROM verdicts WHERE node = ? "
                "ORDER BY since_ms", (v.node,)
            ).fetchall()
            # worst wins; among equals the oldest, so the first cause stays the named one
            worst = max(rows, key=lambda r: HEALTH_ORDER.get(r[0], 0), default=("ok", "", ""))
            db.execute(
                "UPDATE nodes SET health = ?, health_reason = ?, health_evidence = ? "
                "WHERE name = ?",
                (worst[0], worst[1], worst[2], v.node),
            )
            old = str(before[0]) if before else "unknown"
            if publish and old != worst[0]:
                db.execute(
                    "INSERT INTO health_changes (node, before_health, after_health, "
                    "reason_code, evidence, fault_ms, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (v.node, old, worst[0], v.reason_code, v.evidence, v.since_ms, now_ms()),
                )
        return old, str(worst[0])

    def health_changes(self, limit: int = 1000) -> list[HealthChangeRow]:
        """The oldest `limit` health changes other processes queued (set_verdict's
        `publish`), oldest first. The leader polls this: on an empty queue it is one index
        probe, whatever the number of nodes."""
        with self._read() as db:
            rows = db.execute(
                "SELECT id, node, before_health, after_health, reason_code, evidence, fault_ms, "
                "created_ms FROM health_changes ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [HealthChangeRow(*r) for r in rows]

    def delete_health_changes(self, ids: Sequence[int]) -> None:
        """Drop changes the leader has acted on (after acting: a leader that dies in between
        leaves them to the next, which acts again, idempotently)."""
        if not ids:
            return
        with self._tx() as db:
            db.executemany("DELETE FROM health_changes WHERE id = ?", [(i,) for i in ids])

    def verdicts(self, node: str) -> list[VerdictRow]:
        with self._read() as db:
            rows = db.execute(
                "SELECT node, check_name, gpu_index, subject, severity, reason_code, evidence, "
                "since_ms FROM verdicts WHERE node = ? ORDER BY check_name, gpu_index, subject",
                (node,),
            ).fetchall()
        return [VerdictRow(r[0], r[1], None if r[2] < 0 else r[2], *r[3:]) for r in rows]

    # ------------------------------------------------------------ events and actions

    def add_event(
        self, node: str, ts_ms: int, kind: str, severity: str, reason_code: str, evidence: str,
        gpu_index: int | None, xid: int | None, now_ms: int,
        report: tuple[str, int] | None = None,
    ) -> int | None:
        """Store one event; its id. `report` (agent instance, sequence number): the report it
        came in; None when that report's event is stored already (a replay)."""
        instance, seq = report if report is not None else (None, None)
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO events (node, ts_ms, received_ms, kind, severity, reason_code, "
                "evidence, gpu_index, xid, agent_instance, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (node, ts_ms, now_ms, kind, severity, reason_code, evidence, gpu_index, xid,
                 instance, seq),
            ).fetchone()
            return int(row[0]) if row is not None else None

    def events(
        self, node: str | None = None, since_ms: int = 0, limit: int = 1000
    ) -> list[EventRow]:
        """Events with ts_ms >= since_ms (agent clock), the newest `limit` of them, newest last."""
        if limit < 0:
            raise StoreError(f"events: limit must be >= 0, got {limit}")
        q = f"SELECT {_EVENT_COLUMNS} FROM events WHERE ts_ms >= ?"  # noqa: S608 - constant
        args: list[object] = [since_ms]
        if node is not None:
            q += " AND node = ?"
            args.append(node)
        q += " ORDER BY ts_ms DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._read() as db:
            rows = db.execute(q, args).fetchall()
        return [EventRow(*r) for r in reversed(rows)]

    def add_action(
        self, node: str, action: str, reason: str, actor: str, status: str, fault_ms: int | None,
        now_ms: int,
    ) -> int:
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO actions (node, action, reason, actor, status, created_ms, fault_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (node, action, reason, actor, status, now_ms, fault_ms),
            ).fetchone()
            return int(row[0])

    def update_action(self, action_id: int, status: str, detail: str, attempts: int,
                      done_ms: int | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE actions SET status = ?, detail = ?, attempts = ?, done_ms = ? WHERE id = ?",
                (status, detail, attempts, done_ms, action_id),
            )

    def actions(self, node: str | None = None, since_ms: int = 0) -> list[ActionRow]:
        q = ("SELECT id, node, action, reason, actor, status, detail, attempts, created_ms, "
             "done_ms, fault_ms FROM actions WHERE created_ms >= ?")
        args: list[object] = [since_ms]
        if node is not None:
            q += " AND node = ?"
            args.append(node)
        with self._read() as db:
            rows = db.execute(q + " ORDER BY id", args).fetchall()
        return [ActionRow(*r) for r in rows]

    # ------------------------------------------------------------ degraded-policy memory

    def policy_state(self, node: str) -> PolicyRow | None:
        with self._read() as db:
            r = db.execute(
                "SELECT node, original_weight, feature_added, applied_ms FROM policy_state "
                "WHERE node = ?", (node,)
            ).fetchone()
        return PolicyRow(*r) if r else None

    def set_policy_state(self, row: PolicyRow) -> None:
        with self._tx() as db:
            db.execute(
                """INSERT INTO policy_state (node, original_weight, feature_added, applied_ms)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT(node) DO UPDATE SET original_weight=excluded.original_weight,
                     feature_added=excluded.feature_added, applied_ms=excluded.applied_ms""",
                (row.node, row.original_weight, row.feature_added, row.applied_ms),
            )

    def clear_policy_state(self, node: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM policy_state WHERE node = ?", (node,))



    # ------------------------------------------------------------ job checkpoints

    def record_checkpoint(self, row: CheckpointRow) -> bool:
        """Keep the job's newest step; an older or equal one (a replay, a late save from a
        previous run) changes nothing. True when stored."""
        with self._tx() as db:
            cur = db.execute(
                """INSERT INTO checkpoints (job_id, node, step, path, time_ms, uid, received_ms)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(job_id) DO UPDATE SET node=excluded.node, step=excluded.step,
                     path=excluded.path, time_ms=excluded.time_ms, uid=excluded.uid,
                     received_ms=excluded.received_ms
                   WHERE excluded.step > checkpoints.step""",
                (row.job_id, row.node, row.step, row.path, row.time_ms, row.uid,
                 row.received_ms),
            )
            return bool(cur.rowcount)

    def checkpoint(self, job_id: str) -> CheckpointRow | None:
        with self._read() as db:
            r = db.execute(
                "SELECT job_id, node, step, path, time_ms, uid, received_ms FROM checkpoints "
                "WHERE job_id = ?", (job_id,)
            ).fetchone()
        return CheckpointRow(*r) if r else None

    # ------------------------------------------------------------ job recoveries

    def save_recovery(self, row: RecoveryRow) -> int:
        """Insert (row.id == 0) or update a recovery; returns its id."""
        values = (row.job_id, row.node, row.status, row.detail, row.restart, row.fault_ms,
                  row.drain_ms, row.signal_ms, row.requeue_ms, row.running_ms,
                  row.checkpoint_step, row.checkpoint_ms, row.lost_work_ms, row.created_ms)
        with self._tx() as db:
            if row.id == 0:
                r = db.execute(
                    f"INSERT INTO recoveries ({_RECOVERY_FIELDS}) VALUES "  # noqa: S608 - constant
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id", values,
                ).fetchone()
                return int(r[0])
            sets = ", ".join(f"{c.strip()} = ?" for c in _RECOVERY_FIELDS.split(","))
            cur = db.execute(f"UPDATE recoveries SET {sets} WHERE id = ?",  # noqa: S608 - constant
                             (*values, row.id))
            if cur.rowcount == 0:
                raise StoreError(f"recovery {row.id} of job {row.job_id}: no such row")
            return row.id

    def recoveries(self, job_id: str | None = None, since_ms: int = 0) -> list[RecoveryRow]:
        """Recoveries created at or after since_ms (of one job, or all), oldest first."""
        q = f"SELECT id, {_RECOVERY_FIELDS} FROM recoveries WHERE created_ms >= ?"  # noqa: S608
        args: list[object] = [since_ms]
        if job_id is not None:
            q += " AND job_id = ?"
            args.append(job_id)
        with self._read() as db:
            rows = db.execute(q + " ORDER BY id", args).fetchall()
        return [RecoveryRow(*r) for r in rows]


_RECOVERY_FIELDS = ("job_id, node, status, detail, restart, fault_ms, drain_ms, signal_ms, "
                    "requeue_ms, running_ms, checkpoint_step, checkpoint_ms, lost_work_ms, "
                    "created_ms")
