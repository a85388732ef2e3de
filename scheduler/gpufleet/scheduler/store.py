"""The controller's state: nodes, their verdicts, health events and Slurm actions.

One interface (`StateStore`), SQLite as the embedded default (WAL, one file). Schema changes
are numbered migrations applied in order at open; a store written by a newer gpufleet is
refused rather than guessed at. Nothing here talks to Slurm or to agents.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

HEALTH_ORDER = {"unknown": 0, "ok": 1, "warn": 2, "degraded": 3, "fatal": 4}

MIGRATIONS: list[str] = [
    # 1: the foundation schema
    """
    CREATE TABLE nodes (
        name            TEXT PRIMARY KEY,
        hostname        TEXT NOT NULL DEFAULT '',
        gpu_count       INTEGER NOT NULL DEFAULT 0,
        inventory       BLOB,
        health          TEXT NOT NULL DEFAULT 'unknown',
        health_reason   TEXT NOT NULL DEFAULT '',
        health_evidence TEXT NOT NULL DEFAULT '',
        agent_instance  TEXT NOT NULL DEFAULT '',
        last_seq        INTEGER NOT NULL DEFAULT 0,
        first_seen_ms   INTEGER NOT NULL,
        last_seen_ms    INTEGER NOT NULL
    );
    CREATE TABLE verdicts (
        node        TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        check_name  TEXT NOT NULL,
        gpu_index   INTEGER NOT NULL,          -- -1: the node as a whole
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        since_ms    INTEGER NOT NULL,
        PRIMARY KEY (node, check_name, gpu_index)
    );
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        node        TEXT NOT NULL,
        ts_ms       INTEGER NOT NULL,          -- when it happened, agent clock
        received_ms INTEGER NOT NULL,          -- when the controller stored it
        kind        TEXT NOT NULL,
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        gpu_index   INTEGER,
        xid         INTEGER
    );
    CREATE INDEX events_node_ts ON events(node, ts_ms);
    CREATE TABLE actions (
        id          INTEGER PRIMARY KEY,
        node        TEXT NOT NULL,
        action      TEXT NOT NULL,             -- drain, resume, ...
        reason      TEXT NOT NULL,
        actor       TEXT NOT NULL,             -- "policy" or a user name
        status      TEXT NOT NULL,             -- queued, done, failed, skipped, shadow
        detail      TEXT NOT NULL DEFAULT '',
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_ms  INTEGER NOT NULL,
        done_ms     INTEGER,
        fault_ms    INTEGER                    -- the fault that caused it, agent clock
    );
    CREATE INDEX actions_node ON actions(node, created_ms);
    """,
    # 2: verdicts about things that are not GPUs (IB ports, paths) get a subject
    """
    CREATE TABLE verdicts_v2 (
        node        TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        check_name  TEXT NOT NULL,
        gpu_index   INTEGER NOT NULL,          -- -1: not about one GPU
        subject     TEXT NOT NULL DEFAULT '',  -- "mlx5_0/1", "/tmp", ...
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        since_ms    INTEGER NOT NULL,
        PRIMARY KEY (node, check_name, gpu_index, subject)
    );
    INSERT INTO verdicts_v2 (node, check_name, gpu_index, subject, severity, reason_code,
                             evidence, since_ms)
        SELECT node, check_name, gpu_index, '', severity, reason_code, evidence, since_ms
        FROM verdicts;
    DROP TABLE verdicts;
    ALTER TABLE verdicts_v2 RENAME TO verdicts;
    """,
]


class StoreError(Exception):
    """The state store cannot be opened or used; the message names the file or server."""


@dataclass(frozen=True)
class NodeRow:
    name: str
    hostname: str
    gpu_count: int
    health: str
    health_reason: str
    health_evidence: str
    first_seen_ms: int
    last_seen_ms: int


@dataclass(frozen=True)
class ActionRow:
    id: int
    node: str
    action: str
    reason: str
    actor: str
    status: str
    detail: str
    attempts: int
    created_ms: int
    done_ms: int | None
    fault_ms: int | None


@dataclass(frozen=True)
class VerdictRow:
    node: str
    check_name: str
    gpu_index: int | None
    subject: str
    severity: str
    reason_code: str
    evidence: str
    since_ms: int


class StateStore(Protocol):
    def upsert_node(
        self, name: str, hostname: str, gpu_count: int, inventory: bytes, agent_instance: str,
        now_ms: int,
    ) -> None: ...

    def last_seq(self, name: str) -> tuple[str, int]: ...

    def touch_node(self, name: str, agent_instance: str, seq: int, now_ms: int) -> None: ...

    def set_verdict(self, v: VerdictRow) -> tuple[str, str]: ...

    def add_event(
        self, node: str, ts_ms: int, kind: str, severity: str, reason_code: str, evidence: str,
        gpu_index: int | None, xid: int | None, now_ms: int,
    ) -> int: ...

    def nodes(self) -> list[NodeRow]: ...

    def node(self, name: str) -> NodeRow | None: ...

    def verdicts(self, node: str) -> list[VerdictRow]: ...

    def add_action(
        self, node: str, action: str, reason: str, actor: str, status: str, fault_ms: int | None,
        now_ms: int,
    ) -> int: ...

    def update_action(self, action_id: int, status: str, detail: str, attempts: int,
                      done_ms: int | None) -> None: ...

    def actions(self, node: str | None = None, since_ms: int = 0) -> list[ActionRow]: ...

    def close(self) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


_NODE_COLUMNS = ("name, hostname, gpu_count, health, health_reason, health_evidence, "
                 "first_seen_ms, last_seen_ms")


class SqliteStore:
    """SQLite in WAL mode. One connection behind a lock: writes are short and serialised."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                       timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: no corruption on crash
            self._db.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open SQLite store {path}: {e}") from e
        self._lock = threading.Lock()
        self._migrate()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        try:
            with self._tx() as db:
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = db.execute("SELECT max(version) FROM schema_version").fetchone()
                version = row[0] or 0
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"store {self.path} has schema version {version}, newer than this "
                        f"gpufleet knows ({len(MIGRATIONS)}): upgrade gpufleet"
                    )
                for i in range(version, len(MIGRATIONS)):
                    for stmt in MIGRATIONS[i].split(";"):
                        if stmt.strip():
                            db.execute(stmt)
                    db.execute("INSERT INTO schema_version VALUES (?)", (i + 1,))
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable gpufleet SQLite store: {e}") from e

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ nodes

    def upsert_node(
        self, name: str, hostname: str, gpu_count: int, inventory: bytes, agent_instance: str,
        now_ms: int,
    ) -> None:
        with self._tx() as db:
            row = db.execute("SELECT agent_instance FROM nodes WHERE name = ?",
                             (name,)).fetchone()
            if row is not None and row[0] != agent_instance:
                # A new agent instance (restart, reboot) reports every verdict afresh in its
                # first samples; the record of past faults stays in events and actions.
                db.execute("DELETE FROM verdicts WHERE node = ?", (name,))
                db.execute("UPDATE nodes SET health = 'ok', health_reason = '', "
                           "health_evidence = '', last_seq = 0 WHERE name = ?", (name,))
            db.execute(
                """INSERT INTO nodes (name, hostname, gpu_count, inventory, agent_instance,
                                      health, last_seq, first_seen_ms, last_seen_ms)
                   VALUES (?, ?, ?, ?, ?, 'ok', 0, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET
                     hostname=excluded.hostname, gpu_count=excluded.gpu_count,
                     inventory=excluded.inventory, last_seen_ms=excluded.last_seen_ms,
                     agent_instance=excluded.agent_instance""",
                (name, hostname, gpu_count, inventory, agent_instance, now_ms, now_ms),
            )

    def last_seq(self, name: str) -> tuple[str, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT agent_instance, last_seq FROM nodes WHERE name = ?", (name,)
            ).fetchone()
        return (row[0], row[1]) if row else ("", 0)

    def touch_node(self, name: str, agent_instance: str, seq: int, now_ms: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET last_seen_ms = ?, last_seq = max(last_seq, ?) "
                "WHERE name = ? AND agent_instance = ?",
                (now_ms, seq, name, agent_instance),
            )

    def nodes(self) -> list[NodeRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name").fetchall()  # noqa: S608 - constant
        return [NodeRow(*r) for r in rows]

    def node(self, name: str) -> NodeRow | None:
        with self._lock:
            r = self._db.execute(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE name = ?", (name,)  # noqa: S608
            ).fetchone()
        return NodeRow(*r) if r else None

    def inventory(self, name: str) -> bytes | None:
        with self._lock:
            r = self._db.execute("SELECT inventory FROM nodes WHERE name = ?", (name,)).fetchone()
        return bytes(r[0]) if r and r[0] is not None else None

    # ------------------------------------------------------------ verdicts

    def set_verdict(self, v: VerdictRow) -> tuple[str, str]:
        """Store a verdict; return the node's health (worst current verdict) before and after."""
        gpu = -1 if v.gpu_index is None else v.gpu_index
        with self._tx() as db:
            before = db.execute("SELECT health FROM nodes WHERE name = ?", (v.node,)).fetchone()
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
        return (str(before[0]) if before else "unknown"), str(worst[0])

    def verdicts(self, node: str) -> list[VerdictRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT node, check_name, gpu_index, subject, severity, reason_code, evidence, "
                "since_ms FROM verdicts WHERE node = ? ORDER BY check_name, gpu_index, subject",
                (node,),
            ).fetchall()
        return [VerdictRow(r[0], r[1], None if r[2] < 0 else r[2], *r[3:]) for r in rows]

    # ------------------------------------------------------------ events and actions

    def add_event(
        self, node: str, ts_ms: int, kind: str, severity: str, reason_code: str, evidence: str,
        gpu_index: int | None, xid: int | None, now_ms: int,
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO events (node, ts_ms, received_ms, kind, severity, reason_code, "
                "evidence, gpu_index, xid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (node, ts_ms, now_ms, kind, severity, reason_code, evidence, gpu_index, xid),
            )
            return int(cur.lastrowid or 0)

    def add_action(
        self, node: str, action: str, reason: str, actor: str, status: str, fault_ms: int | None,
        now_ms: int,
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO actions (node, action, reason, actor, status, created_ms, fault_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (node, action, reason, actor, status, now_ms, fault_ms),
            )
            return int(cur.lastrowid or 0)

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
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [ActionRow(*r) for r in rows]
