"""`gpufleet whoami --controller HOST:PORT`: who the controller takes you for (FleetUser
WhoAmI), through the same MUNGE credential `acct`, `jobs` and `drain` send. The first thing
to run when one of those is refused: it shows the user and uid MUNGE vouched for and whether
the controller counts them as an admin (root, or its --admin-group).
"""

from __future__ import annotations

import json

import click
from gpufleet.scheduler.service.user_client import (
    UserClientError,
    click_error,
    connect,
    controller_options,
)


@click.command("whoami")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@controller_options
def whoami(as_json: bool, controller: str | None, tls_ca: str | None, tls_cert: str | None,
           tls_key: str | None, insecure: bool, munge_socket: str | None) -> None:
    """Who the controller takes you for: user, uid, admin or not."""
    if not controller:
        raise click.UsageError("whoami asks a controller: pass --controller HOST:PORT "
                               "(or set GPUFLEET_CONTROLLER)")
    client = connect(controller, tls_ca, tls_cert, tls_key, insecure, munge_socket)
    try:
        with client:
            reply = client.whoami()
    except UserClientError as e:
        raise click_error(e) from e
    if as_json:
        click.echo(json.dumps({"user": reply.user, "uid": reply.uid, "admin": reply.admin}))
        return
    click.echo(f"{reply.user} (uid {reply.uid}){', admin' if reply.admin else ''} "
               f"at {controller}")
