"""InfiniBand ports from sysfs: inventory, per-second samples, and faults contained per port."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from gpufleet.agent.infiniband import IbSysfs, parse_gid_port_guid, parse_rate_gbps
from gpufleet.agent.pcie import nic_affinity
from gpufleet.agent.telemetry import IbPortInfo, IbPortSample, PcieRelation

from tests.agent.fake_sysfs import (
    bump_counter,
    make_hca,
    port_dir,
    remove_port,
    set_port,
)

GUID_0 = "506b:4b03:00c1:a2b4"
GUID_1 = "B8CE:F603:0012:34AB"  # upper case: normalised to lower


def two_hca_node(root: Path) -> None:
    """mlx5_0: one NDR port on NUMA 0; mlx5_1: a RoCE port and an HDR port on NUMA 1."""
    make_hca(root, "mlx5_0", GUID_0, numa_node=0, pci_addr="0000:17:00.0")
    make_hca(root, "mlx5_1", GUID_1, numa_node=1, pci_addr="0000:9a:00.0", ports={
        2: {"rate": "200 Gb/sec (4X HDR)", "lid": 0x1a, "sm_lid": 0x2b},
        1: {"rate": "100 Gb/sec (4X EDR)", "link_layer": "Ethernet", "lid": 0, "sm_lid": 0,
            "gid": "fe80:0000:0000:0000:bace:f6ff:fe12:34ab"},
    })


def test_inventory_of_a_two_hca_node(tmp_path: Path) -> None:
    two_hca_node(tmp_path)
    assert IbSysfs(tmp_path).ports() == [
        IbPortInfo(hca="mlx5_0", port=1, node_guid="0x506b4b0300c1a2b4",
                   port_guid="0x506b4b0300c1a2b4", lid=0x10, sm_lid=0x1, state="ACTIVE",
                   phys_state="LinkUp", rate_gbps=400.0, link_layer="InfiniBand", numa_node=0),
        IbPortInfo(hca="mlx5_1", port=1, node_guid="0xb8cef603001234ab",
                   port_guid="0xbacef6fffe1234ab", lid=0, sm_lid=0, state="ACTIVE",
                   phys_state="LinkUp", rate_gbps=100.0, link_layer="Ethernet", numa_node=1),
        IbPortInfo(hca="mlx5_1", port=2, node_guid="0xb8cef603001234ab",
                   port_guid="0xb8cef603001234ac", lid=26, sm_lid=43, state="ACTIVE",
                   phys_state="LinkUp", rate_gbps=200.0, link_layer="InfiniBand", numa_node=1),
    ]


def test_fake_tree_is_laid_out_like_sysfs(tmp_path: Path) -> None:
    """The class entry and `device` are symlinks into /sys/devices, as pcie.py expects."""
    two_hca_node(tmp_path)
    hca = tmp_path / "class/infiniband/mlx5_1"
    assert hca.is_symlink() and (hca / "device").is_symlink()
    assert os.path.realpath(hca / "device") == os.path.realpath(
        tmp_path / "bus/pci/devices/0000:9a:00.0")
    # a "GPU" at mlx5_1's own address is behind the same port; mlx5_0 only shares the bridge
    assert nic_affinity({0: "0000:9a:00.0"}, tmp_path) == [
        (0, "mlx5_0", PcieRelation.PHB), (0, "mlx5_1", PcieRelation.PIX)]


@pytest.mark.parametrize(("text", "gbps"), [
    ("400 Gb/sec (4X NDR)", 400.0),
    ("200 Gb/sec (4X HDR)", 200.0),
    ("100 Gb/sec (4X EDR)", 100.0),
    ("56 Gb/sec (4X FDR)", 56.0),
    ("10 Gb/sec (4X SDR)", 10.0),
    ("2.5 Gb/sec (1X SDR)", 2.5),
    ("25 Gb/sec (1X EDR)", 25.0),
    ("800 Gb/sec (4X XDR)", 800.0),
])
def test_rate_parse(tmp_path: Path, text: str, gbps: float) -> None:
    assert parse_rate_gbps(text) == gbps
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {"rate": text}})
    ib = IbSysfs(tmp_path)
    assert ib.ports()[0].rate_gbps == gbps
    assert ib.sample()[0].rate_gbps == gbps


@pytest.mark.parametrize(("numa", "expected"), [(0, 0), (3, 3), (-1, None)])
def test_numa_node(tmp_path: Path, numa: int, expected: int | None) -> None:
    make_hca(tmp_path, "mlx5_0", GUID_0, numa_node=numa)
    assert IbSysfs(tmp_path).ports()[0].numa_node == expected


def test_port_guid_is_the_last_eight_bytes_of_gid_0() -> None:
    assert parse_gid_port_guid("fe80:0000:0000:0000:506b:4b03:00c1:a2b4") == "0x506b4b0300c1a2b4"
    assert parse_gid_port_guid("fe80::506b:4b03:c1:a2b4") == "0x506b4b0300c1a2b4"


def test_sample_reports_state_and_counters(tmp_path: Path) -> None:
    two_hca_node(tmp_path)
    set_port(tmp_path, "mlx5_1", 2, counters={"symbol_error": 5, "port_rcv_errors": 7})
    assert IbSysfs(tmp_path).sample() == [
        IbPortSample("mlx5_0", 1, "ACTIVE", "LinkUp", 400.0, 0, 0, 0, 0, 0),
        IbPortSample("mlx5_1", 1, "ACTIVE", "LinkUp", 100.0, 0, 0, 0, 0, 0),
        IbPortSample("mlx5_1", 2, "ACTIVE", "LinkUp", 200.0, symbol_error=5, link_downed=0,
                     link_error_recovery=0, port_rcv_errors=7, port_xmit_discards=0),
    ]


def test_down_trained_port_is_active_with_its_real_rate(tmp_path: Path) -> None:
    """An NDR port that trained at 100 Gb/s is still ACTIVE: only its rate shows the fault."""
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {}, 2: {"rate": "100 Gb/sec (4X EDR)"}})
    ib = IbSysfs(tmp_path)
    assert [(p.port, p.state, p.rate_gbps) for p in ib.ports()] == [
        (1, "ACTIVE", 400.0), (2, "ACTIVE", 100.0)]
    assert [(p.port, p.state, p.phys_state, p.rate_gbps) for p in ib.sample()] == [
        (1, "ACTIVE", "LinkUp", 400.0), (2, "ACTIVE", "LinkUp", 100.0)]


def test_flapping_port_is_reported_as_it_is_at_each_sample(tmp_path: Path) -> None:
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {}, 2: {}})
    ib = IbSysfs(tmp_path)
    seen = []
    for i in range(6):
        if i % 2:  # link goes down, the HCA counts it
            set_port(tmp_path, "mlx5_0", 1, state="1: DOWN", phys_state="2: Polling")
            bump_counter(tmp_path, "mlx5_0", 1, "link_downed")
            bump_counter(tmp_path, "mlx5_0", 1, "link_error_recovery", 3)
        else:
            set_port(tmp_path, "mlx5_0", 1, state="4: ACTIVE", phys_state="5: LinkUp")
        first, second = ib.sample()
        seen.append((first.state, first.phys_state, first.link_downed, first.link_error_recovery))
        assert (second.state, second.link_downed) == ("ACTIVE", 0)  # the neighbour is steady
    assert seen == [
        ("ACTIVE", "LinkUp", 0, 0),
        ("DOWN", "Polling", 1, 3),
        ("ACTIVE", "LinkUp", 1, 3),
        ("DOWN", "Polling", 2, 6),
        ("ACTIVE", "LinkUp", 2, 6),
        ("DOWN", "Polling", 3, 9),
    ]


@pytest.mark.parametrize("missing", ["symbol_error", "link_downed", "link_error_recovery",
                                     "port_rcv_errors", "port_xmit_discards"])
def test_missing_counter_is_none(tmp_path: Path, missing: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {"counters": {missing: None}}})
    (sample,) = IbSysfs(tmp_path).sample()
    values = {c: getattr(sample, c) for c in ("symbol_error", "link_downed",
                                              "link_error_recovery", "port_rcv_errors",
                                              "port_xmit_discards")}
    assert values.pop(missing) is None
    assert set(values.values()) == {0}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # normal, not a fault


def test_no_counters_directory_and_no_pma(tmp_path: Path) -> None:
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {}, 2: {}})
    for c in ("symbol_error", "link_downed", "link_error_recovery", "port_rcv_errors",
              "port_xmit_discards"):
        (port_dir(tmp_path, "mlx5_0", 1) / "counters" / c).unlink()
    set_port(tmp_path, "mlx5_0", 2, counters={"symbol_error": "N/A (no PMA)"})
    first, second = IbSysfs(tmp_path).sample()
    assert first == IbPortSample("mlx5_0", 1, "ACTIVE", "LinkUp", 400.0)
    assert second.symbol_error is None and second.link_downed == 0


@pytest.mark.parametrize(("field", "garbage", "effect"), [
    ("state", "ACTIVE?", "skipped"),
    ("state", "", "skipped"),
    ("phys_state", "\x00\x01", "skipped"),
    ("rate", "fast", {"rate_gbps": 0.0}),
    ("counters", {"symbol_error": "lots"}, {"symbol_error": None}),
    ("counters", {"link_downed": "-1"}, {"link_downed": None}),
])
def test_garbage_in_one_file_does_not_stop_other_ports(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        field: str, garbage: object, effect: str | dict[str, object]) -> None:
    two_hca_node(tmp_path)
    set_port(tmp_path, "mlx5_1", 1, **{field: garbage})
    ib = IbSysfs(tmp_path)
    with caplog.at_level(logging.WARNING):
        samples = {(s.hca, s.port): s for s in ib.sample()}
        inventory = {(p.hca, p.port) for p in ib.ports()}
    assert {("mlx5_0", 1), ("mlx5_1", 2)} <= samples.keys()
    assert {("mlx5_0", 1), ("mlx5_1", 2)} <= inventory
    if effect == "skipped":
        assert ("mlx5_1", 1) not in samples and ("mlx5_1", 1) not in inventory
    else:
        assert isinstance(effect, dict)
        bad = samples[("mlx5_1", 1)]
        assert {k: getattr(bad, k) for k in effect} == effect
    # one warning naming the file; the log is not repeated every second
    name = next(iter(garbage)) if isinstance(garbage, dict) else field
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert f"mlx5_1/ports/1/{'counters/' if field == 'counters' else ''}{name}" in warned[0]
    caplog.clear()
    ib.sample()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("field", "garbage", "default"), [
    ("lid", "zz", {"lid": 0}),
    ("sm_lid", None, {"sm_lid": 0}),
    ("gid", "not-a-gid", {"port_guid": ""}),
    ("link_layer", None, {"link_layer": ""}),
])
def test_bad_inventory_field_is_unknown_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        field: str, garbage: object, default: dict[str, object]) -> None:
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {field: garbage}, 2: {}})
    with caplog.at_level(logging.WARNING):
        first, second = IbSysfs(tmp_path).ports()
    assert {k: getattr(first, k) for k in default} == default
    assert first.state == "ACTIVE" and second.lid == 0x10
    assert any("ports/1/" in r.getMessage() for r in caplog.records)


def test_garbage_node_guid(tmp_path: Path) -> None:
    make_hca(tmp_path, "mlx5_0", "xyz")
    make_hca(tmp_path, "mlx5_1", GUID_0, pci_addr="0000:18:00.0")
    assert [p.node_guid for p in IbSysfs(tmp_path).ports()] == ["", "0x506b4b0300c1a2b4"]


def test_unreadable_state_skips_the_port(tmp_path: Path) -> None:
    """A read error (the kernel's ib_query_port failing) is contained like garbage."""
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {}, 2: {}})
    state = port_dir(tmp_path, "mlx5_0", 1) / "state"
    state.unlink()
    state.mkdir()  # reading a directory fails with EISDIR, as a failing attribute would
    assert [p.port for p in IbSysfs(tmp_path).sample()] == [2]


def test_port_down_without_rate_is_reported(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """A DOWN port may have no readable rate; it must still be reported, and quietly."""
    make_hca(tmp_path, "mlx5_0", GUID_0, ports={1: {"state": "1: DOWN",
                                                    "phys_state": "3: Disabled",
                                                    "rate": None}})
    with caplog.at_level(logging.WARNING):
        (s,) = IbSysfs(tmp_path).sample()
    assert (s.state, s.phys_state, s.rate_gbps) == ("DOWN", "Disabled", 0.0)
    assert not caplog.records


def test_no_infiniband_directory(tmp_path: Path) -> None:
    ib = IbSysfs(tmp_path)
    assert ib.ports() == []
    assert ib.sample() == []
    (tmp_path / "class" / "infiniband").mkdir(parents=True)
    assert IbSysfs(tmp_path).ports() == []


def test_port_removed_between_samples_disappears(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    two_hca_node(tmp_path)
    ib = IbSysfs(tmp_path)
    assert len(ib.sample()) == 3
    remove_port(tmp_path, "mlx5_1", 1)
    with caplog.at_level(logging.WARNING):
        assert [(s.hca, s.port) for s in ib.sample()] == [("mlx5_0", 1), ("mlx5_1", 2)]
        assert [(s.hca, s.port) for s in ib.sample()] == [("mlx5_0", 1), ("mlx5_1", 2)]
    assert not caplog.records  # a removal is not a broken file


def test_whole_hca_removed(tmp_path: Path) -> None:
    two_hca_node(tmp_path)
    ib = IbSysfs(tmp_path)
    assert len(ib.sample()) == 3
    (tmp_path / "class/infiniband/mlx5_1").unlink()
    assert [(s.hca, s.port) for s in ib.sample()] == [("mlx5_0", 1)]
    assert [(p.hca, p.port) for p in ib.ports()] == [("mlx5_0", 1)]


def test_new_port_is_found_at_the_next_rescan(tmp_path: Path) -> None:
    now = [0.0]
    make_hca(tmp_path, "mlx5_0", GUID_0)
    ib = IbSysfs(tmp_path, rescan_s=60.0, clock=lambda: now[0])
    assert len(ib.sample()) == 1
    make_hca(tmp_path, "mlx5_1", GUID_1, pci_addr="0000:18:00.0")
    now[0] = 59.0
    assert len(ib.sample()) == 1  # the cached port list: no directory listing every second
    now[0] = 60.0
    assert [(s.hca, s.port) for s in ib.sample()] == [("mlx5_0", 1), ("mlx5_1", 1)]


def test_sample_reads_only_state_rate_and_counters(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap: after the first call, no directory listing and eight small files per port."""
    two_hca_node(tmp_path)
    ib = IbSysfs(tmp_path)
    ib.sample()
    opened: list[str] = []
    listed: list[str] = []
    real_open, real_listdir = os.open, os.listdir

    def spy_open(path: str, flags: int, *args: int) -> int:
        opened.append(os.path.basename(path))
        return real_open(path, flags, *args)

    def spy_listdir(path: str) -> list[str]:
        listed.append(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "listdir", spy_listdir)
    ib.sample()
    assert listed == []
    assert len(opened) == 3 * 8
    assert set(opened) == {"state", "phys_state", "rate", "symbol_error", "link_downed",
                           "link_error_recovery", "port_rcv_errors", "port_xmit_discards"}
