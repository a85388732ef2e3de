"""How a user command gets its UserApi: `--controller HOST:PORT` (or GPUFLEET_CONTROLLER) ->
RemoteUserApi, over gRPC as the calling user (MUNGE); otherwise LocalUserApi over the store
(--db) and, for drain/resume, Slurm on this host. The command itself is written once.

On the head node, whoever can open the store acts as an admin: the store's file permissions
(and Slurm's, for scontrol) are the authorisation there, as before this API existed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click
from gpufleet.scheduler.slurm import SlurmClient
from gpufleet.scheduler.userapi.model import Caller, PermissionDenied, UserApi, UserApiError

_T = TypeVar("_T")


def local_caller() -> Caller:
    """This host's user (the sudo caller if any), trusted as an admin (see above)."""
    from gpufleet.scheduler.health.admin import caller_name

    return Caller(os.geteuid(), os.getegid(), caller_name(), admin=True)


@contextmanager
def user_api(db: str, controller: str | None, tls_ca: str | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, insecure: bool = False,
             munge_socket: str | None = None,
             slurm: Callable[[], SlurmClient] | None = None) -> Iterator[UserApi]:
    """The API for one command, closed after it. `slurm`: the Slurm client drain/resume
    act on locally (made only on the local path)."""
    api: UserApi
    if controller:
        from gpufleet.scheduler.service.user_client import connect
        from gpufleet.scheduler.service.user_remote import RemoteUserApi

        api = RemoteUserApi(connect(controller, tls_ca, tls_cert, tls_key, insecure,
                                    munge_socket))
    else:
        from gpufleet.scheduler.cli.settings import open_existing_store
        from gpufleet.scheduler.service.convert import stored_inventories
        from gpufleet.scheduler.userapi.local import LocalUserApi

        client = slurm() if slurm is not None else None
        store = open_existing_store(db)
        api = LocalUserApi(store, client, local_caller(), inventories=stored_inventories(store))
    try:
        yield api
    finally:
        api.close()


def ask(call: Callable[[], _T]) -> _T:
    """One call on the API; its error as one line on stderr and exit status 1, the same
    whichever implementation answered."""
    from gpufleet.scheduler.store import StoreError

    try:
        return call()
    except PermissionDenied as e:
        raise click.ClickException(f"refused: {e}") from e
    except (UserApiError, StoreError) as e:
        raise click.ClickException(str(e)) from e
