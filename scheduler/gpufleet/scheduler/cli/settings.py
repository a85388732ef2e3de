"""Settings every `gpufleet` command shares: the config file, the store, logging.

Settings: flag > environment (GPUFLEET_<FLAG>, e.g. GPUFLEET_DB) > config file (--config,
default /etc/gpufleet/controller.toml) > built-in default.
"""

from __future__ import annotations

import logging
import sys
import tomllib
from pathlib import Path

import click
from gpufleet.scheduler.store import StateStore, StoreError, open_store

DEFAULT_CONFIG = Path("/etc/gpufleet/controller.toml")
DEFAULT_DB = "/var/lib/gpufleet/state.db"
# keys of controller.toml: the `controller` command's options (the admin commands read `db`
# and `slurm` from the same file)
CONFIG_KEYS = {
    "listen", "db", "slurm", "slurm_rest_socket", "slurm_rest_url", "slurm_jwt_file", "shadow",
    "resume_quiet_s", "unreachable_after_s", "reassert_s",
    "drain_unreachable", "degraded_weight", "degraded_feature", "metrics_listen",
    "tls_ca", "tls_cert", "tls_key", "insecure",
    "recover", "recovery_grace_s", "recovery_max_restarts", "recovery_signal",
    "munge_socket", "admin_group", "audit_log", "switch_holds",
    "switch_hold_grace_s",
    # the repair loop (gpufleet.scheduler.cli.repair)
    "repair", "repair_journal", "repair_policy", "repair_max_per_partition",
    "repair_fail_limit", "repair_fail_window_s", "repair_diag_level", "repair_shadow",
    "routine_diag_every_s", "routine_diag_idle_s", "routine_diag_batch", "routine_diag_level",
    "routine_diag_timeout_s",
    "alertmanager_url", "alert_webhook_url",
}
_ADMIN_KEYS = {"db", "slurm"}

def load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    path = Path(value) if value else DEFAULT_CONFIG
    if value is None and not path.exists():
        return value
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise click.BadParameter(f"{path}: no such config file") from e
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except PermissionError as e:
        if value is None:  # the controller's own file (0640 root:slurm): not for users
            return value
        raise click.BadParameter(f"{path}: cannot read: {e.strerror}") from e
    except OSError as e:
        raise click.BadParameter(f"{path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path}: not valid TOML: {e}") from e
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(CONFIG_KEYS))}"
        )
    if isinstance(data.get("repair_policy"), dict):  # {reboot = "ask"} -> ["reboot=ask"]
        data["repair_policy"] = [f"{k}={v}" for k, v in data["repair_policy"].items()]
    admin = {k: v for k, v in data.items() if k in _ADMIN_KEYS}
    journal = {k: v for k, v in data.items() if k == "repair_journal"}
    ctx.default_map = {
        "controller": data,
        "nodes": {"db": admin.get("db", DEFAULT_DB), "show": {"db": admin.get("db", DEFAULT_DB)},
                  "history": {"db": admin.get("db", DEFAULT_DB), **journal}},
        "repair": dict.fromkeys(("approve", "skip", "cancel", "list"), journal),
        "drain": admin,
        "resume": admin,
        "events": {k: v for k, v in admin.items() if k == "db"},
        "jobs": {"show": {"db": admin.get("db", DEFAULT_DB)}},
    }
    return value


def open_existing_store(db: str) -> StateStore:
    if "://" not in db and not Path(db).exists():
        raise click.ClickException(
            f"no gpufleet store at {db}: is the controller running, or pass --db/GPUFLEET_DB"
        )
    try:
        return open_store(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


db_option = click.option(
    "--db",
    default=DEFAULT_DB,
    show_default=True,
    envvar="GPUFLEET_DB",
    help="state store: a SQLite file, or postgresql://USER@HOST/DB (standby controllers share one)",
)


