"""SlurmClient over slurmrestd, the API SchedMD recommends for external controllers.

Reads (nodes, one node, ping) go to slurmrestd over a unix socket or TCP, authenticated with a
JWT (`X-SLURM-USER-NAME` / `X-SLURM-USER-TOKEN`; slurmctld needs AuthAltTypes=auth/jwt).

The API version is learnt once from slurmrestd's own OpenAPI document (GET /openapi/v3: the
newest /slurm/vX.Y.Z/ it serves that gpufleet reads), unless given. Each version's documents
are read with that version's schema (schema.py): v0.0.38 is Slurm 22.05's, v0.0.39 23.02's,
v0.0.40..v0.0.45 the data_parser of 23.11..26.05.

Node *updates* are not in Slurm 22.05's REST API: its OpenAPI document (v0.0.38, fetched from
a real 22.05.8 slurmrestd) has only GET on /node/{node_name} and /nodes; `POST
/slurm/v0.0.39/node/{node_name}` arrived with 23.02. So on 22.05 drain, resume, weight and
features go through `scontrol update` (the CLI client); from v0.0.39 on they are POSTed to
slurmrestd.

Jobs (for checkpoint recovery): reads come from slurmrestd (`GET jobs`, `GET job/{id}`: the
same document as `squeue --json`); signal, requeue and job updates go through `scancel` /
`scontrol` on every version, because no REST API version has "signal the batch shell only"
or requeue with the semantics recovery needs (DELETE job/{id}?signal= signals every step).

Every request has a timeout. Connection refused, a missing socket, a timeout and HTTP 5xx
are transient SlurmErrors; an unknown node, a refused token and bad input are not.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from gpufleet.scheduler.slurm.cli import CliSlurmClient
from gpufleet.scheduler.slurm.schema import (
    KNOWN_API_VERSIONS,
    Reader,
    api_version_tuple,
    reader_for_data_parser,
)
from gpufleet.scheduler.slurm.types import (
    SlurmClient,
    SlurmError,
    SlurmJob,
    SlurmJobClient,
    SlurmNode,
    SlurmNodeInfo,
    check_features,
    check_job_id,
    check_node_name,
    check_weight,
    clean_reason,
    is_permanent_message,
)

DEFAULT_API_VERSION = "v0.0.38"  # Slurm 22.05's only API
_API_PATH = re.compile(r"^/slurm/(v\d+\.\d+\.\d+)/")
# Slurm's ESLURM_INVALID_NODE_NAME: the node does not exist; retrying will not help
ESLURM_INVALID_NODE_NAME = 2018
_UPDATE_VERSIONS_FROM = (0, 0, 39)  # first API version with POST /node/{name}


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def api_version_from_openapi(doc: Any, where: str) -> str:
    """slurmrestd's /openapi/v3 document -> the newest /slurm/vX.Y.Z/ it serves that gpufleet
    reads; a SlurmError naming the field when there is none."""
    paths = doc.get("paths") if isinstance(doc, dict) else None
    if not isinstance(paths, dict):
        raise SlurmError(f"{where}: field 'paths' is missing from the OpenAPI document",
                         transient=False)
    served = {m.group(1) for p in paths if (m := _API_PATH.match(str(p)))}
    known = [v for v in KNOWN_API_VERSIONS if v in served]
    if not known:
        raise SlurmError(f"{where}: field 'paths' has no /slurm/ API gpufleet reads (serves "
                         f"{', '.join(sorted(served)) or 'none'}; reads "
                         f"{', '.join(KNOWN_API_VERSIONS)})", transient=False)
    return max(known, key=api_version_tuple)


class RestSlurmClient:
    """SlurmClient over slurmrestd; `socket_path` (unix) or `url` (http://host:port)."""

    def __init__(
        self,
        socket_path: str | Path | None = None,
        url: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        user_name: str = "root",
        api_version: str | None = None,
        timeout_s: float = 5.0,
        update_client: SlurmClient | None = None,
        env: dict[str, str] | None = None,
        job_action_client: SlurmJobClient | None = None,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise SlurmError("RestSlurmClient needs exactly one of socket_path or url",
                             transient=False)
        self.socket_path = str(socket_path) if socket_path is not None else None
        self.url = url
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SlurmError(f"slurmrestd url {url!r}: want http(s)://host:port",
                                 transient=False)
        self._token = token
        self.token_file = Path(token_file) if token_file is not None else None
        self.user_name = user_name
        self.timeout_s = timeout_s
        self._api_version = api_version
        if api_version is not None:
            reader_for_data_parser(api_version)  # an unknown version fails here, not later
        # 22.05: updates via scontrol (see the module docstring)
        self.update_client = update_client or CliSlurmClient(env=env, timeout_s=timeout_s)
        # job actions via scancel/scontrol on every version (module docstring)
        self.job_action_client: SlurmJobClient = (
            job_action_client if job_action_client is not None
            else update_client if isinstance(update_client, CliSlurmClient)
            else CliSlurmClient(env=env, timeout_s=timeout_s))

    @property
    def api_version(self) -> str:
        """Given, or learnt once from slurmrestd's /openapi/v3."""
        if self._api_version is None:
            where = f"slurmrestd GET /openapi/v3 at {self.endpoint}"
            self._api_version = api_version_from_openapi(self._get_raw("/openapi/v3", where),
                                                         where)
        return self._api_version

    @property
    def reader(self) -> Reader:
        return reader_for_data_parser(self.api_version)

    @property
    def _native_updates(self) -> bool:
        return api_version_tuple(self.api_version) >= _UPDATE_VERSIONS_FROM

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else str(self.url)

    def _token_now(self) -> str:
        # re-read on every call, so a token rotated on disk is picked up without a restart
        if self.token_file is not None:
            try:
                text = self.token_file.read_text().strip()
            except OSError as e:
                raise SlurmError(f"cannot read slurmrestd token file {self.token_file}: {e}",
                                 transient=False) from e
            return text.removeprefix("SLURM_JWT=")
        return self._token or os.environ.get("SLURM_JWT", "")

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixHTTPConnection(self.socket_path, self.timeout_s)
        parts = urlsplit(str(self.url))
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname or "", parts.port, timeout=self.timeout_s)

    def _get_raw(self, full: str, what: str) -> dict[str, Any]:
        return self._send("GET", full, None, what)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 node: str | None = None) -> dict[str, Any]:
        try:
            api = self.api_version
        except SlurmError as e:
            raise SlurmError(f"{e}" + (f" for node {node}" if node else ""),
                             transient=e.transient) from e
        full = f"/slurm/{api}/{path}"
        what = f"slurmrestd {method} {full} at {self.endpoint}" + (
            f" for node {node}" if node else "")
        return self._send(method, full, body, what)

    def _send(self, method: str, full: str, body: dict[str, Any] | None,
              what: str) -> dict[str, Any]:
        headers = {"X-SLURM-USER-NAME": self.user_name, "X-SLURM-USER-TOKEN": self._token_now(),
                   "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, full, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError as e:
            raise SlurmError(f"{what} timed out after {self.timeout_s} s") from e
        except (ConnectionError, FileNotFoundError, OSError, http.client.HTTPException) as e:
            raise SlurmError(f"{what} failed: {e}") from e
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw.strip() else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {"errors": [{"error": f"response is not a JSON object: {raw[:100]!r}"}]}
        errors = [e for e in (doc.get("errors") or []) if isinstance(e, dict)]
        if resp.status in {401, 403, 511}:  # 24.11+ answers a refused token with 511
            text = raw.decode(errors="replace").strip()[:200]
            raise SlurmError(f"{what}: HTTP {resp.status} {text} (check the JWT and "
                             "AuthAltTypes=auth/jwt)", transient=False)
        if resp.status >= 400 or errors:
            msg = "; ".join(": ".join(dict.fromkeys(
                str(e[k]) for k in ("description", "error") if e.get(k))) or str(e)
                for e in errors) or raw.decode(errors="replace").strip()[:200]
            # 22.05 names Slurm's error number "errno", data_parser versions "error_number"
            # error_number 0 ("No error"): Slurm answered and found nothing (24.11+'s GET
            # node/{name} of an unknown node): a retry gets the same
            permanent = any(e.get("errno") == ESLURM_INVALID_NODE_NAME
                            or e.get("error_number") in (ESLURM_INVALID_NODE_NAME, 0)
                            for e in errors) \
                or is_permanent_message(msg) or 400 <= resp.status < 500
            raise SlurmError(f"{what}: HTTP {resp.status}: {msg}", transient=not permanent)
        return doc

    # ------------------------------------------------------------------ reads

    def ping(self) -> bool:
        try:
            doc = self._request("GET", "ping")
        except SlurmError:
            return False
        pings = [p for p in doc.get("pings") or [] if isinstance(p, dict)]
        api = api_version_tuple(self.api_version)
        if api < (0, 0, 39):  # 22.05: "ping": "UP"
            return any(p.get("ping") == "UP" for p in pings)
        if api < (0, 0, 42):  # 23.02..24.05: "pinged": "UP"
            return any(p.get("pinged") == "UP" for p in pings)
        return any(p.get("responding") is True for p in pings)  # 24.11+

    def _what(self, path: str) -> str:
        return f"slurmrestd GET /slurm/{self.api_version}/{path} at {self.endpoint}"

    def node_infos(self) -> dict[str, SlurmNodeInfo]:
        """Every node with its GPUs, partitions, CPUs and LastBusyTime (GET nodes)."""
        doc = self._request("GET", "nodes")
        return {i.node.name: i for i in self.reader.read_nodes(doc, self._what("nodes"))}

    def nodes(self) -> dict[str, SlurmNode]:
        return {name: i.node for name, i in self.node_infos().items()}

    def node(self, name: str) -> SlurmNode:
        path = f"node/{quote(check_node_name(name))}"
        doc = self._request("GET", path, node=name)
        found = [i.node for i in self.reader.read_nodes(doc, self._what(path))
                 if i.node.name == name]
        if not found:
            raise SlurmError(f"slurmrestd at {self.endpoint}: node {name} not found",
                             transient=False)
        return found[0]

    # ------------------------------------------------------------------ updates

    def _update(self, name: str, changes: dict[str, Any]) -> None:
        self._request("POST", f"node/{quote(check_node_name(name))}", changes, node=name)

    def drain(self, name: str, reason: str) -> None:
        if not self._native_updates:
            self.update_client.drain(name, reason)
            return
        self._update(name, {"state": ["DRAIN"], "reason": clean_reason(reason)})

    def resume(self, name: str) -> None:
        if not self._native_updates:
            self.update_client.resume(name)
            return
        self._update(name, {"state": ["RESUME"]})

    def set_weight(self, name: str, weight: int) -> None:
        if not self._native_updates:
            self.update_client.set_weight(name, weight)
            return
        self._update(name, {"weight": check_weight(name, weight)})

    def set_features(self, name: str, features: tuple[str, ...]) -> None:
        if not self._native_updates:
            self.update_client.set_features(name, features)
            return
        # a comma-separated string: an empty list would mean "no change" to slurmrestd, an
        # empty string clears (as `scontrol update availablefeatures=` does)
        value = ",".join(check_features(name, features))
        self._update(name, {"features": value, "features_act": value})

    # ------------------------------------------------------------------ jobs (recovery)

    def pending_jobs(self) -> list[SlurmJob]:
        """Jobs waiting to start (GET jobs, the squeue --json document; filtered here)."""
        doc = self._request("GET", "jobs")
        return [j for j in self.reader.read_jobs(doc, self._what("jobs"))
                if j.state == "PENDING"]

    def jobs_on_node(self, node: str) -> list[SlurmJob]:
        """Jobs slurmctld still holds (any state, MinJobAge) whose allocation has `node`.
        22.05's GET jobs has no node filter: the list is filtered here."""
        check_node_name(node)
        doc = self._request("GET", "jobs", node=node)
        jobs = self.reader.read_jobs(doc, self._what("jobs"))
        return [j for j in jobs if node in j.nodes]

    def job(self, job_id: str) -> SlurmJob | None:
        """The job while slurmctld still holds it; None once it is gone (Slurm answers an
        unknown id with an error, which is not a failure here)."""
        try:
            doc = self._request("GET", f"job/{quote(check_job_id(job_id))}")
        except SlurmError as e:
            # 22.05 answers an unknown id with HTTP 500 "Unable to find JobId=N"
            text = str(e).lower()
            # 24.11+: HTTP 404 "Unable to query JobId=N"
            if any(m in text for m in ("unable to find jobid", "invalid job id", "unknown job",
                                       "unable to query jobid")):
                return None
            raise
        found = [j for j in self.reader.read_jobs(doc, self._what(f"job/{job_id}"))
                 if j.job_id == job_id]
        return found[0] if found else None

    def signal_job(self, job_id: str, signal: str, scope: str) -> None:
        self.job_action_client.signal_job(job_id, signal, scope)

    def requeue(self, job_id: str) -> None:
        self.job_action_client.requeue(job_id)

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None:
        self.job_action_client.update_job(job_id, start_now_plus_s=start_now_plus_s,
                                          excluded_nodes=excluded_nodes)
