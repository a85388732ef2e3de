"""The whole agent as a process: config file, fake InfiniBand tree, /metrics, controller."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.agent.fake_sysfs import make_hca, set_port
from tests.support import wait_for
from tests.support.net import free_port
from tests.support.prometheus import promtool


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Controller, Path, int]]:
    sysfs = tmp_path / "sys"
    make_hca(sysfs, "mlx5_0", "506b:4b03:00c1:a2b4")
    make_hca(sysfs, "mlx5_1", "506b:4b03:00c1:a2b5", pci_addr="0000:9a:00.0")
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, None, listen="127.0.0.1:0")
    ctl.start()
    metrics_port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'controller = "127.0.0.1:{ctl.port}"\n'
        'gpu_backend = "simulated"\n'
        'node_name = "gpu07"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'sysfs_root = "{sysfs}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        "interval_s = 0.2\n"
        "expected_ib_rate_gbps = 400\n"
        f'disk_paths = ["{tmp_path}"]\n'
        "[debounce]\nib_port = 2\n"
    )
    agent = subprocess.Popen([sys.executable, "-m", "gpufleet.agent", "run", "--config", str(cfg)],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield ctl, sysfs, metrics_port
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=10)
        assert "Traceback" not in err, err
        ctl.stop()
        store.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_agent_reports_ib_and_serves_clean_metrics(running) -> None:
    ctl, sysfs, port = running
    wait_for(lambda: "gpufleet_gpu_temperature_celsius{" in _scrape(port), what="a scrape",
             step_s=0.1, ignore=(OSError,))
    text = _scrape(port)
    assert 'gpufleet_ib_port_state_up{hca="mlx5_1",port="1"} 1.0' in text
    assert 'gpufleet_gpu_info{gpu="7"' in text
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30, check=False)
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr

    inv = ctl.store.inventory("gpu07")
    assert inv is not None
    from gpufleet.rpc.v1 import fleet_pb2 as pb

    ports = pb.NodeInventory.FromString(inv).ib_ports
    assert [(p.hca, p.node_guid, p.rate_gbps) for p in ports] == [
        ("mlx5_0", "0x506b4b0300c1a2b4", 400.0), ("mlx5_1", "0x506b4b0300c1a2b5", 400.0)]

    # the compute rail trains down to HDR: a degraded verdict reaches the controller
    set_port(sysfs, "mlx5_1", 1, rate="200 Gb/sec (4X HDR)")
    wait_for(lambda: ctl.store.node("gpu07").health == "degraded", step_s=0.1, ignore=(OSError,))
    (v,) = [v for v in ctl.store.verdicts("gpu07") if v.check_name == "ib_port"]
    assert (v.subject, v.reason_code) == ("mlx5_1/1", "ib_rate_low")
    assert "gpufleet_node_health_severity 3.0" in _scrape(port)
