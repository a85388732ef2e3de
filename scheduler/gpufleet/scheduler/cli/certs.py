"""`gpufleet certs`: the cluster CA and per-node certificates (parses, then calls certs.py).

Prints the paths it wrote, never key material.
"""

from __future__ import annotations

from pathlib import Path

import click
from gpufleet.scheduler.access import certs

DEFAULT_CA_DIR = "/etc/gpufleet/ca"

ca_dir_option = click.option(
    "--ca-dir",
    default=DEFAULT_CA_DIR,
    show_default=True,
    envvar="GPUFLEET_CA_DIR",
    type=click.Path(file_okay=False),
    help="where ca.crt and ca.key live (keep it on the admin host, not on compute nodes)",
)
force_option = click.option(
    "--force", is_flag=True, help="replace existing files (the old ones are gone: keep a copy)"
)


@click.group(name="certs")
def certs_group() -> None:
    """The cluster CA and the certificates agents and the controller use for mTLS."""


@certs_group.command()
@ca_dir_option
@click.option("--cluster-name", default="gpufleet", show_default=True, help="goes into the CA name")
@click.option(
    "--days", type=click.IntRange(1, certs.MAX_VALIDITY_DAYS), default=certs.CA_VALIDITY_DAYS,
    show_default=True,
)
@force_option
def init(ca_dir: str, cluster_name: str, days: int, force: bool) -> None:
    """Create the cluster CA: CA_DIR/ca.crt (0644) and CA_DIR/ca.key (0600)."""
    try:
        out = certs.init_ca(Path(ca_dir), cluster_name, days, force)
    except certs.CertError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"CA certificate {out.cert_path} (valid until {out.not_after:%Y-%m-%d})")
    click.echo(f"CA key         {out.key_path} (mode 0600; copy it nowhere)")


@certs_group.command()
@click.argument("node")
@ca_dir_option
@click.option(
    "--role",
    type=click.Choice(certs.ROLES),
    default="agent",
    show_default=True,
    help="agent (a compute node) or controller (the head node)",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where NODE-ROLE.crt/.key go [default: CA_DIR/issued]",
)
@click.option(
    "--san",
    "extra_sans",
    multiple=True,
    help="another DNS name or IP address for the subjectAltName (repeatable)",
)
@click.option(
    "--days", type=click.IntRange(1, certs.MAX_VALIDITY_DAYS), default=certs.LEAF_VALIDITY_DAYS,
    show_default=True,
)
@force_option
def issue(
    node: str,
    ca_dir: str,
    role: str,
    out_dir: str | None,
    extra_sans: tuple[str, ...],
    days: int,
    force: bool,
) -> None:
    """Issue a key and certificate for NODE (its name goes into the subjectAltName)."""
    try:
        out = certs.issue(
            Path(ca_dir), node, role, Path(out_dir) if out_dir else None, extra_sans, days, force
        )
    except certs.CertError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{role} certificate {out.cert_path} (valid until {out.not_after:%Y-%m-%d})")
    click.echo(f"{role} key         {out.key_path} (mode 0600)")


if __name__ == "__main__":
    # `python -m gpufleet.scheduler.cli.certs certs ...` reads like `gpufleet certs ...`
    # (the Ansible roles call either)
    click.Group(commands={"certs": certs_group})()
