"""The SQLite state store: migrations, node identity, verdicts -> health, actions."""

from __future__ import annotations

import sqlite3

import pytest
from gpufleet.scheduler.store import MIGRATIONS, SqliteStore, StoreError, VerdictRow


def test_migrations_apply_once_and_reopen(tmp_path) -> None:
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    assert s.schema_version() == len(MIGRATIONS)
    s.upsert_node("n1", "host1", 8, b"inv", "a", 1000)
    s.close()
    s = SqliteStore(path)  # reopening keeps the data and applies nothing twice
    assert [n.name for n in s.nodes()] == ["n1"]
    assert s.schema_version() == len(MIGRATIONS)


def test_newer_schema_is_refused_and_left_alone(tmp_path) -> None:
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version VALUES (99)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99, newer"):
        SqliteStore(path)
    assert sqlite3.connect(path).execute("SELECT count(*) FROM nodes").fetchone()[0] == 0


def test_not_a_database_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "state.db"
    path.write_text("this is not sqlite")
    with pytest.raises(StoreError, match=r"state\.db"):
        SqliteStore(path)
    assert path.read_text() == "this is not sqlite"  # nothing stored is lost


def test_worst_verdict_is_node_health(tmp_path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    s.upsert_node("n1", "h", 8, b"", "a", 1)
    assert s.set_verdict(VerdictRow("n1", "thermal", 2, "", "warn", "hot", "GPU 2 88C", 10)) == (
        "ok", "warn")
    assert s.set_verdict(VerdictRow("n1", "xid", 3, "", "fatal", "xid79", "GPU 3 lost", 20)) == (
        "warn", "fatal")
    # a later fatal verdict does not replace the first cause as the node's reason
    s.set_verdict(VerdictRow("n1", "gpu_lost", 3, "", "fatal", "gpu_lost", "GPU 3 silent", 30))
    node = s.node("n1")
    assert node is not None and (node.health, node.health_reason) == ("fatal", "xid79")
    s.set_verdict(VerdictRow("n1", "xid", 3, "", "ok", "ok", "", 40))
    s.set_verdict(VerdictRow("n1", "gpu_lost", 3, "", "ok", "ok", "", 40))
    node = s.node("n1")
    assert node is not None and node.health == "warn"


def test_new_agent_instance_resets_verdicts_and_sequence(tmp_path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    s.upsert_node("n1", "h", 8, b"", "a", 1)
    s.touch_node("n1", "a", 41, 2)
    s.set_verdict(VerdictRow("n1", "xid", 3, "", "fatal", "xid79", "GPU 3", 3))
    assert s.last_seq("n1") == ("a", 41)
    s.upsert_node("n1", "h", 8, b"", "a", 4)  # same instance reconnecting: keeps its place
    assert s.last_seq("n1") == ("a", 41)
    s.upsert_node("n1", "h", 8, b"", "b", 5)  # restarted agent
    assert s.last_seq("n1") == ("b", 0)
    assert s.verdicts("n1") == []
    node = s.node("n1")
    assert node is not None and node.health == "ok" and node.first_seen_ms == 1


def test_actions_are_recorded(tmp_path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    a = s.add_action("n1", "drain", "gpufleet:xid79", "policy", "queued", 100, 150)
    s.update_action(a, "done", "was IDLE", 1, 180)
    (row,) = s.actions("n1")
    assert (row.status, row.attempts, row.done_ms - row.fault_ms) == ("done", 1, 80)


def test_migration_2_keeps_verdicts_of_a_version_1_store(tmp_path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO nodes (name, first_seen_ms, last_seen_ms) VALUES ('n1', 1, 1)")
    db.execute("INSERT INTO verdicts VALUES ('n1', 'xid', 3, 'fatal', 'xid79', 'GPU 3', 5)")
    db.commit()
    db.close()
    s = SqliteStore(path)
    assert s.schema_version() == len(MIGRATIONS)
    assert s.verdicts("n1") == [VerdictRow("n1", "xid", 3, "", "fatal", "xid79", "GPU 3", 5)]


def test_two_ib_ports_are_two_verdicts(tmp_path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    s.upsert_node("n1", "h", 8, b"", "a", 1)
    s.set_verdict(VerdictRow("n1", "ib_port", None, "mlx5_0/1", "degraded", "ib_port_down", "", 1))
    s.set_verdict(VerdictRow("n1", "ib_port", None, "mlx5_1/1", "degraded", "ib_port_down", "", 2))
    assert [v.subject for v in s.verdicts("n1")] == ["mlx5_0/1", "mlx5_1/1"]
    s.set_verdict(VerdictRow("n1", "ib_port", None, "mlx5_0/1", "ok", "ok", "", 3))
    assert [v.subject for v in s.verdicts("n1")] == ["mlx5_1/1"]
