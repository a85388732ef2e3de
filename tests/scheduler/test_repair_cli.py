"""`gpufleet repair approve|skip|cancel|list`, `gpufleet nodes history NODE` and the
controller's repair options: requests land in the journal, bad input is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.scheduler.cli.main import main
from gpufleet.scheduler.cli.repair import parse_policy
from gpufleet.scheduler.repair import Journal, RepairConfig, RepairManager
from gpufleet.scheduler.repair.engine import Step
from gpufleet.scheduler.store import SqliteStore

from tests.scheduler.fakes import FakeSlurm


class _Agents:
    def send(self, _cmd: object) -> bool:
        return True

    def boot_id(self, _node: str) -> str | None:
        return "b"


def test_requests_reach_the_controller_through_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "repair.jsonl"
    slurm = FakeSlurm(["n1"])
    rm = RepairManager(slurm, Journal(path), RepairConfig(policy={"reboot": "ask"}), _Agents(),
                       _Agents(), lambda *a: None)  # type: ignore[arg-type]
    slurm.drain("n1", "gpufleet:xid79 GPU 3")
    rm.node_fatal("n1", "xid79", "GPU 3 fell off the bus")
    rm.tick()
    assert rm.cases["n1"].step == Step.APPROVAL
    r = CliRunner().invoke(main, ["repair", "list", "--repair-journal", str(path)])
    assert r.exit_code == 0 and "n1" in r.output and "approval" in r.output
    r = CliRunner().invoke(main, ["repair", "cancel", "n1", "--repair-journal", str(path),
                                  "--note", "ticket 12"])
    assert r.exit_code == 0, r.output
    rm.tick()
    assert rm.cases["n1"].step == Step.CANCELLED
    store = SqliteStore(tmp_path / "state.db")
    store.close()
    r = CliRunner().invoke(main, ["nodes", "history", "n1", "--repair-journal", str(path),
                                  "--db", str(tmp_path / "state.db"), "--json"])
    assert r.exit_code == 0, r.output
    whats = [row["what"] for row in json.loads(r.output)]
    assert whats[0] == "repair fault"
    assert "request cancel" in whats and "repair cancelled" in whats


@pytest.mark.parametrize(("args", "problem"), [
    (["repair", "approve", "n1;reboot"], "invalid node name"),
    (["repair", "frobnicate", "n1"], "No such command"),
])
def test_bad_admin_input_is_one_line(tmp_path: Path, args: list[str], problem: str) -> None:
    (tmp_path / "j").write_text("")
    r = CliRunner().invoke(main, [*args, "--repair-journal", str(tmp_path / "j")])
    assert r.exit_code == 2 and problem in r.output and "Traceback" not in r.output


def test_no_journal_says_what_to_do(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["repair", "approve", "n1", "--repair-journal",
                                  str(tmp_path / "none.jsonl")])
    assert r.exit_code == 1 and "is the controller running with --repair" in r.output


def test_policy_option_parsing() -> None:
    assert parse_policy(["reboot=ask", "reset_gpu=never"]) == {
        "reset_gpu": "never", "reboot": "ask", "none": "auto"}
    for bad in ("reboot", "reboot=maybe", "contact_support=auto"):
        with pytest.raises(Exception, match="CLASS=POLICY"):
            parse_policy([bad])


def test_controller_toml_takes_a_policy_table(tmp_path: Path) -> None:
    cfg = tmp_path / "controller.toml"
    cfg.write_text('repair = true\ninsecure = true\nrepair_policy = {reboot = "sometimes"}\n')
    r = CliRunner().invoke(main, ["--config", str(cfg), "controller", "--db",
                                  str(tmp_path / "s.db")])
    assert r.exit_code == 2
    assert "reboot=sometimes" in r.output and "Traceback" not in r.output
