"""`gpufleet acct` over a real SQLite store: filters, grouping, formats, totals, bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.scheduler.accounting.ledger import UsageRow
from gpufleet.scheduler.cli.acct import acct
from gpufleet.scheduler.store import open_store

T0 = 1_700_000_040_000


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "state.db")
    s = open_store(path)
    rows = []
    for job, user, account, gpus, dur_s in (("1", "ann", "phys", 2, 100),
                                            ("2", "bob", "chem", 1, 50),
                                            ("3", "ann", "phys", 4, 10)):
        for g in range(gpus):
            rows.append(UsageRow(job, "n1", g, user, account, T0, T0 + dur_s * 1000,
                                 T0 + dur_s * 1000, dur_s * 1000, dur_s * 500, dur_s * 300_000))
    s.record_usage(rows)
    s.close()
    return path


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(acct, [*args, "-S", "2023-01-01"])
    return r.exit_code, r.output


def test_group_by_account_json_totals(db: str) -> None:
    code, out = _run("--db", db, "--group-by", "account", "--json")
    assert code == 0, out
    doc = json.loads(out)
    rows = {r["account"]: r for r in doc["rows"]}
    assert rows["phys"]["alloc_gpu_s"] == 2 * 100 + 4 * 10
    assert rows["phys"]["busy_pct"] == 50.0 and rows["phys"]["jobs"] == 2
    assert rows["chem"]["energy_j"] == 50 * 300
    assert doc["total"]["alloc_gpu_s"] == 240 + 50


def test_filters_csv_and_table(db: str) -> None:
    code, out = _run("--db", db, "-u", "ann", "-j", "3,1", "--csv")
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["job"] for r in rows] == ["1", "3", "TOTAL"]
    assert rows[-1]["gpus"] == "6"
    code, out = _run("--db", db, "-A", "chem")
    assert code == 0 and "bob" in out and "TOTAL" in out and "ann" not in out


@pytest.mark.parametrize(("args", "message"), [
    (["-j", "12;3"], "'12;3' is not a Slurm job id"),
    (["-S", "yesterday"], "'yesterday' is not a time"),
    (["--json", "--csv"], "exclude each other"),
    (["--group-by", "rack"], "'rack' is not one of"),
    (["--clip", "--group-by", "job"], "--clip works with"),
])
def test_bad_input_is_named(db: str, args: list[str], message: str) -> None:
    r = CliRunner().invoke(acct, ["--db", db, *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(acct, ["--db", str(tmp_path / "nope.db")])
    assert r.exit_code == 1 and "no gpufleet store at" in r.output
