"""The command relay's SQL in the state store (migration 12; service/command_relay.py uses
it): which controller process holds each node's agent stream, the repair commands queued
for a node whose stream is on another process, and the agents' answers queued for the
leader. Shared by both backends, like base.py; nothing here talks to agents or Slurm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from .rows import AgentCommandRow, CommandResultRow


class RelayStoreMixin:
    """Command-relay methods of SqlStore; the backend hooks come from SqlStore."""

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def publish_streams(self, holder: str, up: Sequence[str], down: Sequence[str],
                        now_ms: int) -> None:
        """`holder` (one controller process) holds the agent streams of `up` now and no
        longer those of `down`; its beat is `now_ms`. A node another process took meanwhile
        (its agent reconnected there) stays that process's."""
        with self._tx() as db:
            db.execute(
                """INSERT INTO ingest_processes (holder, started_ms, beat_ms) VALUES (?, ?, ?)
                   ON CONFLICT(holder) DO UPDATE SET beat_ms=excluded.beat_ms""",
                (holder, now_ms, now_ms))
            if up:
                db.executemany(
                    """INSERT INTO agent_streams (node, holder, since_ms) VALUES (?, ?, ?)
                       ON CONFLICT(node) DO UPDATE SET holder=excluded.holder,
                         since_ms=excluded.since_ms""",
                    [(n, holder, now_ms) for n in up])
            if down:
                db.executemany("DELETE FROM agent_streams WHERE node = ? AND holder = ?",
                               [(n, holder) for n in down])

    def stream_holders(self, live_since_ms: int, node: str | None = None) -> dict[str, str]:
        """node -> the process holding its stream, for holders that beat at or after
        `live_since_ms` (a dead process's rows are left out); `node`: that one only."""
        sql = ("SELECT s.node, s.holder FROM agent_streams s JOIN ingest_processes p "
               "ON p.holder = s.holder WHERE p.beat_ms >= ?")
        params: tuple[Any, ...] = (live_since_ms,)
        if node is not None:
            sql += " AND s.node = ?"
            params += (node,)
        with self._read() as db:
            return {str(r[0]): str(r[1]) for r in db.execute(sql, params).fetchall()}

    def forget_streams(self, holder: str) -> None:
        """`holder` stops (cleanly): none of its streams is held any more."""
        with self._tx() as db:
            db.execute("DELETE FROM agent_streams WHERE holder = ?", (holder,))
            db.execute("DELETE FROM ingest_processes WHERE holder = ?", (holder,))

    def prune_relay(self, dead_before_ms: int, commands_before_ms: int) -> tuple[int, int]:
        """Drop processes that have not beaten since `dead_before_ms` (and their streams),
        and commands queued before `commands_before_ms` that no process claimed;
        -> (processes, commands) dropped."""
        with self._tx() as db:
            db.execute("DELETE FROM agent_streams WHERE holder IN (SELECT holder FROM "
                       "ingest_processes WHERE beat_ms < ?)", (dead_before_ms,))
            dead = db.execute("DELETE FROM ingest_processes WHERE beat_ms < ?",
                              (dead_before_ms,)).rowcount
            stale = db.execute("DELETE FROM agent_commands WHERE created_ms < ?",
                               (commands_before_ms,)).rowcount
        return max(dead, 0), max(stale, 0)

    def queue_command(self, row: AgentCommandRow) -> int:
        """Queue a command for the process that holds `row.node`'s stream; -> its id."""
        with self._tx() as db:
            r = db.execute(
                "INSERT INTO agent_commands (node, kind, request_id, gpus, level, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (row.node, row.kind, row.request_id, ",".join(str(g) for g in row.gpus),
                 row.level, row.created_ms)).fetchone()
        return int(r[0])

    def claim_commands(self, holder: str) -> list[AgentCommandRow]:
        """Take (delete and return) the commands queued for the nodes whose streams `holder`
        holds, oldest first. Exactly once: of two claimers of one command only the one whose
        DELETE removed the row gets it (PostgreSQL: the second DELETE waits for the first
        to commit, then finds nothing; SQLite: writers are serialised)."""
        with self._read() as db:  # almost always empty: no write transaction for nothing
            rows = db.execute(
                "SELECT c.id, c.node, c.kind, c.request_id, c.gpus, c.level, c.created_ms "
                "FROM agent_commands c JOIN agent_streams s ON s.node = c.node "
                "WHERE s.holder = ? ORDER BY c.id", (holder,)).fetchall()
        if not rows:
            return []
        with self._tx() as db:
            taken = [r for r in rows
                     if db.execute("DELETE FROM agent_commands WHERE id = ?",
                                   (r[0],)).rowcount == 1]
        return [AgentCommandRow(int(r[0]), str(r[1]), str(r[2]), str(r[3]),
                                tuple(int(g) for g in str(r[4]).split(",") if g),
                                int(r[5]), int(r[6])) for r in taken]

    def add_command_result(self, row: CommandResultRow) -> int:
        """Queue an agent's answer for the leader; -> its id."""
        with self._tx() as db:
            r = db.execute(
                "INSERT INTO command_results (node, request_id, kind, ok, could_not_run, "
                "detail, failed_checks, evidence, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (row.node, row.request_id, row.kind, int(row.ok), int(row.could_not_run),
                 row.detail, json.dumps(list(row.failed_checks)), row.evidence,
                 row.created_ms)).fetchone()
        return int(r[0])

    def command_results(self, limit: int = 1000) -> list[CommandResultRow]:
        """The oldest `limit` answers other processes queued, oldest first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT id, node, request_id, kind, ok, could_not_run, detail, failed_checks, "
                "evidence, created_ms FROM command_results ORDER BY id LIMIT ?",
                (limit,)).fetchall()
        return [CommandResultRow(int(r[0]), str(r[1]), str(r[2]), str(r[3]), bool(r[4]),
                                 bool(r[5]), str(r[6]), tuple(str(c) for c in json.loads(r[7])),
                                 str(r[8]), int(r[9])) for r in rows]

    def delete_command_results(self, ids: Sequence[int]) -> None:
        """Drop answers the leader handed to its repair loop."""
        if not ids:
            return
        with self._tx() as db:
            db.executemany("DELETE FROM command_results WHERE id = ?", [(i,) for i in ids])
