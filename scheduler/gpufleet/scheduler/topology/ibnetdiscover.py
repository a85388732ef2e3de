"""Parser for `ibnetdiscover` output in every form infiniband-diags prints, old and current:
the topology report (plain, `-f` full, `-s` with its "DR path" progress lines, `-g` chassis
grouping with `[ext N]` ports, `-m`), the `-p` ports report, the `-l`/`-H`/`-S`/`-R` node
lists, and ibsim's `net` files (the topology grammar with `Hca` for `Ca` and no GUIDs).

It only reads text; it never runs `ibnetdiscover`. Every line is either understood or rejected
with an `IbParseError` naming the source and the 1-based line number, so a truncated or
hand-edited dump is never half-read in silence.

One module (~490 lines): every output form of ibnetdiscover goes through one line grammar;
splitting the forms would copy it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "LANE_RATE_GBPS",
    "DumpLink",
    "DumpNode",
    "DumpPort",
    "IbDump",
    "IbParseError",
    "parse_ibnetdiscover",
    "rate_gbps",
]

# Nominal data rate per lane, as sysfs `rate` reports it (4X NDR = 400 Gb/sec).
LANE_RATE_GBPS: dict[str, float] = {
    "SDR": 2.5,
    "DDR": 5.0,
    "QDR": 10.0,
    "FDR10": 10.0,
    "FDR": 14.0,
    "EDR": 25.0,
    "HDR": 50.0,
    "NDR": 100.0,
    "XDR": 200.0,
}
# Ordering of speeds for "slower than": FDR10 signals faster than QDR though its rate is equal.
SPEED_RANK: dict[str, int] = {s: i for i, s in enumerate(LANE_RATE_GBPS)}


def rate_gbps(width: int, speed: str) -> float | None:
    """4, "NDR" -> 400.0; None for an unknown speed ("???" on an unconnected port)."""
    lane = LANE_RATE_GBPS.get(speed)
    return None if lane is None else width * lane


class IbParseError(ValueError):
    """A line of an ibnetdiscover dump that is not in any format this parser knows."""

    def __init__(self, source: str, line_no: int, problem: str, line: str = "") -> None:
        self.source = source
        self.line_no = line_no
        self.problem = problem
        self.line = line
        shown = f": {line.strip()[:120]!r}" if line.strip() else ""
        super().__init__(f"{source}:{line_no}: {problem}{shown}")


@dataclass
class DumpPort:
    """One port of a node as the dump shows it; `peer` is None for an unconnected port."""

    port: int
    port_guid: str | None = None
    lid: int | None = None
    width: int | None = None
    speed: str | None = None
    attrs: dict[str, int] = field(default_factory=dict)  # s= w= v= e= of `ibnetdiscover -f`
    connected: bool = True


@dataclass
class DumpNode:
    """A switch, CA or router. `node_id` is the quoted name ("S-<guid>", "H-<guid>", "Hca1")."""

    node_id: str
    kind: str  # "switch", "ca", "router"
    guid: str | None  # 0x + 16 hex digits, lower case; None in ibsim net files
    nports: int | None = None
    description: str = ""
    lid: int | None = None
    vendid: str | None = None
    devid: str | None = None
    sysimgguid: str | None = None
    ports: dict[int, DumpPort] = field(default_factory=dict)
    line_no: int = 0


@dataclass(frozen=True)
class DumpLink:
    """One cable, listed once however many times the dump shows it (a < b by (id, port))."""

    a: str
    a_port: int
    b: str
    b_port: int
    width: int | None
    speed: str | None
    line_no: int

    @property
    def rate_gbps(self) -> float | None:
        return None if self.width is None or self.speed is None else rate_gbps(
            self.width, self.speed)


@dataclass
class IbDump:
    source: str
    fmt: str  # "topology", "ports", "list" (-l/-H/-S/-R: nodes, no links), "ibsim"
    nodes: dict[str, DumpNode] = field(default_factory=dict)
    links: list[DumpLink] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # tool diagnostics mixed into the dump


def norm_guid(text: str) -> str:
    """'8f10403960985', '0x0008F10403960985' -> '0x0008f10403960985'."""
    digits = text.lower().removeprefix("0x")
    if _HEX16.fullmatch(digits) is None:
        raise ValueError(f"not a GUID: {text!r}")
    return "0x" + digits.rjust(16, "0")


_HEX16 = re.compile(r"[0-9a-f]{1,16}")


_KIND = {"switch": "switch", "ca": "ca", "hca": "ca", "rt": "router"}
_ID_GUID = re.compile(r"^[SHR]-([0-9a-fA-F]{16})$")
# the description runs to the last quote: node descriptions may hold '"' or '#'
_HEADER = re.compile(
    r'^(Switch|Ca|Hca|Rt)\s+(\d+)\s+"([^"]+)"\s*(?:#\s*"(.*)"\s*(.*))?$', re.IGNORECASE
)
# [local][ext N](guid)? "remote"[port][ext N] (guid)? # comment
# `-g` adds "[ext N]" (external port numbers of chassis); some old releases printed "{N}"
_EXT = r"(?:\[ext\s+\d+\]|\{\d+\})?"
_PORT = re.compile(
    rf'^\[(\d+)\]{_EXT}(?:\(([0-9a-fA-F]+)\))?\s*"([^"]+)"\[(\d+)\]{_EXT}'
    r'\s*(?:\(([0-9a-fA-F]+)\))?\s*(.*)$'
)
# ibsim port options: [1] "Hca1"[1]  w=12 s=2  (enabled widths / speeds)
_IBSIM_OPTS = re.compile(r"^((?:[ws]=\d+\s*)+)(#.*)?$")
# ibsim settings lines that apply to the nodes after them
_IBSIM_SET = re.compile(r"^(speed|width|hcaguids|module|pdebug)\s*=")
_LID_ONLY = re.compile(r"^lid\s+(\d+)\s+lmc\s+\d+$")  # ibsim CA port: "# lid 11 lmc 0"
_CA_LID = re.compile(r"^lid\s+(\d+)\s+lmc\s+\d+\s+(.*)$")
# `-f` adds s= w= v= (e=); Xsigo peers get " slot N" or " (scp)"
_TAIL = re.compile(
    r'^"(.*)"\s+lid\s+(\d+)\s+(\S+)((?:\s+[a-z]+=\d+)*)(?:\s+slot\s+\d+|\s+\(scp\))?\s*$')
# width is "1x".."12x" or "??" when unknown; speed "SDR".."XDR" or "???"
_LINKRATE = re.compile(r"^(\d+x|\?\?)([A-Za-z0-9]+|\?\?\?)$")
# `-g` appends "# <chassis type> <slot>" to switchguid and "# Chassis N (name)" to sysimgguid
_GUIDLINE = re.compile(
    r"^(switchguid|caguid|rtguid|sysimgguid)=(0x[0-9a-fA-F]+)(?:\([0-9a-fA-F]+\))?"
    r"\s*(?:#.*)?$")
_ATTR = re.compile(r"^(vendid|devid)=(0x[0-9a-fA-F]+)$")
# stderr of libibmad/ibnetdiscover captured with the dump ("src/query_smp.c:195; umad ...")
_DIAG = re.compile(r"^(\S+\.c:\d+;|ibwarn:|ibnetdiscover:|ibdebug|ibpanic:|iberror:)")
# `-s`: libibnetdisc's progress, one line per node reached ("DR path slid 0; dlid 0; 0,1 -> new
# Switch {0008f105...} portnum 0 lid 2-2 "..."), printed on stdout before the dump
_PROGRESS = re.compile(r"^DR path\b")
# `-g`: chassis headers; Xsigo chassis also name their host
_CHASSIS = re.compile(r"^(Non-Chassis Nodes|Chassis \S.*|\S+ Chassis \S.*|Hostname: .*)$")
_PORTS_LINE = re.compile(
    r"^(CA|SW|RT)\s+(\d+)\s+(\d+)\s+(0x[0-9a-fA-F]+)\s+(\d+x|\?\?)\s+(\S+)\s*(.*)$"
)
# `-l`, `-H`, `-S`, `-R`: `Switch\t : 0x0008f105... ports 36 devid 0xc738 vendid 0x2c9 "desc"`
_LIST_LINE = re.compile(
    r'^(Ca|Switch|Router)\s*:\s*(0x[0-9a-fA-F]+)\s+ports\s+(\d+)\s+devid\s+(0x[0-9a-fA-F]+)'
    r'\s+vendid\s+(0x[0-9a-fA-F]+)\s+"(.*)"\s*$'
)
# `--diff` prints "< " / "> " before each record of the two fabrics
_DIFF = re.compile(r"^[<>] (Switch|Ca|Rt|\[|numports)")
_PORTS_PEER = re.compile(
    r"^-\s+(CA|SW|RT)\s+(\d+)\s+(\d+)\s+(0x[0-9a-fA-F]+)\s+\(\s*'(.*)'\s+-\s+'(.*)'\s*\)\s*$"
)


def parse_ibnetdiscover(text: str, source: str = "<ibnetdiscover>") -> IbDump:
    """Parse any of the formats; raises IbParseError with the line number."""
    lines = text.splitlines()
    for raw in lines:
        s = raw.strip()
        if not s or s.startswith("#") or _PROGRESS.match(s) or _DIAG.match(s):
            continue
        if _PORTS_LINE.match(s):
            return _parse_ports(lines, source)
        if _LIST_LINE.match(s):
            return _parse_list(lines, source)
        break
    return _Topology(source).parse(lines)


class _Topology:
    def __init__(self, source: str) -> None:
        self.dump = IbDump(source, "topology")
        self.pending: dict[str, str] = {}  # vendid/devid/guids seen before the next header
        self.node: DumpNode | None = None
        self.seen: dict[tuple[str, int], tuple[str, int, int]] = {}  # (id,port) -> peer, line
        self.remote_desc: dict[str, str] = {}  # what port comments say about other nodes
        self.remote_lid: dict[str, int] = {}
        self.last_remote: tuple[str, int] | None = None

    def err(self, line_no: int, problem: str, line: str = "") -> IbParseError:
        return IbParseError(self.dump.source, line_no, problem, line)

    def parse(self, lines: list[str]) -> IbDump:
        for i, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line:
                self.node = None  # a blank (or whitespace-only) line ends a record
                continue
            if line.startswith("#"):
                continue
            if line.startswith("["):
                self._port(i, line)
            elif m := _HEADER.match(line):
                self._header(i, m)
            elif m := _GUIDLINE.match(line):
                try:
                    self.pending[m.group(1)] = norm_guid(m.group(2))
                except ValueError as e:
                    raise self.err(i, str(e), raw) from e
            elif m := _ATTR.match(line):
                self.pending[m.group(1)] = m.group(2).lower()
            else:
                self._other(i, line, raw)
        self._finish()
        return self.dump

    def _other(self, i: int, line: str, raw: str) -> None:
        """A line outside the records: chassis headings, progress, tool diagnostics."""
        if _CHASSIS.match(line) or _PROGRESS.match(line):
            return
        if _IBSIM_SET.match(line):
            self.dump.fmt = "ibsim"
        elif _DIAG.match(line):
            self.dump.warnings.append(f"line {i}: {line}")
        elif _DIFF.match(line):
            raise self.err(i, "this is `ibnetdiscover --diff` output (two fabrics "
                              "compared), not a fabric", raw)
        elif line.split(maxsplit=1)[0] in ("include", "do"):
            raise self.err(i, "ibsim 'include'/'do' directives are not followed", raw)
        else:
            raise self.err(i, "not an ibnetdiscover line", raw)

    def _header(self, i: int, m: re.Match[str]) -> None:
        kind_word, nports, node_id, desc, rest = m.groups()
        kind = _KIND[kind_word.lower()]
        if kind_word.lower() == "hca":
            self.dump.fmt = "ibsim"
        guid_key = {"switch": "switchguid", "ca": "caguid", "router": "rtguid"}[kind]
        guid = self.pending.get(guid_key)
        if (gm := _ID_GUID.match(node_id)) is not None:
            id_guid = norm_guid(gm.group(1))
            if guid is not None and guid != id_guid:
                raise self.err(i, f"{guid_key}={guid} does not match node id {node_id}")
            guid = id_guid
        if node_id in self.dump.nodes:
            raise self.err(i, f"node {node_id!r} defined twice (first on line "
                              f"{self.dump.nodes[node_id].line_no})")
        node = DumpNode(node_id, kind, guid, int(nports), desc or "", line_no=i,
                        vendid=self.pending.get("vendid"), devid=self.pending.get("devid"),
                        sysimgguid=self.pending.get("sysimgguid"))
        if rest and (lm := re.search(r"\blid\s+(\d+)", rest)):
            node.lid = int(lm.group(1))
        self.dump.nodes[node_id] = node
        self.pending = {}
        self.node = node

    def _port(self, i: int, line: str) -> None:
        if self.node is None:
            raise self.err(i, "port line outside a Switch/Ca record", line)
        m = _PORT.match(line)
        if m is None:
            raise self.err(i, "malformed port line", line)
        lport, lguid, rid, rport, rguid, rest = m.groups()
        local = self.node
        port = DumpPort(int(lport))
        if local.nports is not None and not 0 < port.port <= max(local.nports, 1) + 1:
            # +1: some switches number ports past the count (e.g. SHARP port 65 of 64+1)
            raise self.err(i, f"port {port.port} outside 1..{local.nports} of {local.node_id}",
                           line)
        try:
            if lguid:
                port.port_guid = norm_guid(lguid)
            elif local.kind == "switch":
                port.port_guid = local.guid  # switch ports share the node GUID
            remote_port_guid = norm_guid(rguid) if rguid else None
        except ValueError as e:
            raise self.err(i, str(e), line) from e
        self.last_remote = None
        self._comment(i, rest, port, line)
        if self.last_remote is not None:
            self.remote_desc.setdefault(rid, self.last_remote[0])
            self.remote_lid.setdefault(rid, self.last_remote[1])
        if port.port in local.ports:
            raise self.err(i, f"port {port.port} of {local.node_id} listed twice", line)
        local.ports[port.port] = port
        key = (local.node_id, port.port)
        peer = (rid, int(rport))
        self.seen[key] = (rid, int(rport), i)
        del remote_port_guid  # the remote record carries its own port GUID
        back = self.seen.get(peer)
        if back is not None and (back[0], back[1]) != key:
            raise self.err(i, f"{local.node_id}[{port.port}] -> {rid}[{rport}], but line "
                              f"{back[2]} says {rid}[{rport}] -> {back[0]}[{back[1]}]", line)

    def _comment(self, i: int, rest: str, port: DumpPort, line: str) -> None:
        rest = rest.strip()
        if opts := _IBSIM_OPTS.match(rest):
            for kv in opts.group(1).split():
                k, v = kv.split("=")
                port.attrs[k] = int(v)
            if "w" in port.attrs:
                port.width = port.attrs["w"]
            rest = (opts.group(2) or "").strip()
            self.dump.fmt = "ibsim"
        if not rest:
            return
        if not rest.startswith("#"):
            raise self.err(i, "text after the port is not a '#' comment", line)
        body = rest[1:].strip()
        if lm := _LID_ONLY.match(body):
            port.lid = int(lm.group(1))
            return
        # CA side: "lid 16 lmc 1 "desc" lid 3 4xSDR"; switch side: ""desc" lid 4 4xSDR"
        if lm := _CA_LID.match(body):
            port.lid = int(lm.group(1))
            body = lm.group(2)
        tail = _TAIL.match(body)
        if tail is None:
            raise self.err(i, "port comment lacks '\"description\" lid N WIDTHxSPEED'", line)
        self.last_remote = (tail.group(1), int(tail.group(2)))
        rm = _LINKRATE.match(tail.group(3))
        if rm is None:
            raise self.err(i, f"bad link width/speed {tail.group(3)!r}", line)
        width, speed = rm.group(1), rm.group(2).upper()
        # "??" / "???": the tool could not read the port (no PortInfo): known to be cabled only
        port.width = None if width == "??" else int(width[:-1])
        port.speed = None if speed == "???" else speed
        if port.speed is not None and port.speed not in LANE_RATE_GBPS:
            raise self.err(i, f"unknown link speed {rm.group(2)!r}", line)
        for kv in tail.group(4).split():
            k, v = kv.split("=")
            port.attrs[k] = int(v)

    def _finish(self) -> None:
        nodes = self.dump.nodes
        done: set[tuple[str, int]] = set()
        for (nid, port), (rid, rport, line_no) in self.seen.items():
            if (nid, port) in done:
                continue
            if rid not in nodes:
                self._stub(rid, line_no)
            done.add((nid, port))
            done.add((rid, rport))
            p = nodes[nid].ports[port]
            q = nodes[rid].ports.get(rport)
            # the ends can disagree (old dumps): a link runs at the lesser of the two
            widths = [w for w in (p.width, q.width if q else None) if w is not None]
            speeds = [v for v in (p.speed, q.speed if q else None) if v is not None]
            width = min(widths) if widths else None
            speed = min(speeds, key=lambda v: SPEED_RANK.get(v, -1)) if speeds else None
            if q is None:  # only one end listed the cable (a stub, or an excerpt)
                q = nodes[rid].ports[rport] = DumpPort(rport)
            # both ends report the same negotiated link; fill one from the other
            q.width = q.width if q.width is not None else width
            q.speed = q.speed if q.speed is not None else speed
            if q.port_guid is None and nodes[rid].kind == "switch":
                q.port_guid = nodes[rid].guid
            p.width, p.speed = width, speed
            a, b = sorted([(nid, port), (rid, rport)])
            self.dump.links.append(DumpLink(a[0], a[1], b[0], b[1], width, speed, line_no))


    def _stub(self, rid: str, line_no: int) -> None:
        """A node only seen from its neighbours (an excerpt of a dump): keep what is known."""
        kind = {"S": "switch", "H": "ca", "R": "router"}.get(rid[:1])
        gm = _ID_GUID.match(rid)
        if kind is None or gm is None:
            raise IbParseError(self.dump.source, line_no,
                               f"port is cabled to {rid!r}, which has no record")
        self.dump.nodes[rid] = DumpNode(rid, kind, norm_guid(gm.group(1)), None,
                                        self.remote_desc.get(rid, ""),
                                        lid=self.remote_lid.get(rid), line_no=line_no)
        self.dump.warnings.append(f"line {line_no}: {rid} has no record of its own")


def _parse_ports(  # noqa: PLR0915 - a line grammar, read top to bottom
        lines: list[str], source: str) -> IbDump:
    """`ibnetdiscover -p`: one line per port, `TYPE LID PORT GUID WIDTHx SPEED [- peer (...)]`.

    GUIDs here are port GUIDs (for a switch the same as its node GUID), so CA nodes are keyed
    "H-<port guid>" and carry the GUID on their port for the agent join.
    """
    dump = IbDump(source, "ports")
    seen_links: set[tuple[tuple[str, int], tuple[str, int]]] = set()

    def node_for(i: int, kind: str, lid: str, guid_text: str, desc: str) -> DumpNode:
        try:
            guid = norm_guid(guid_text)
        except ValueError as e:
            raise IbParseError(source, i, str(e), lines[i - 1]) from e
        k = {"CA": "ca", "SW": "switch", "RT": "router"}[kind]
        node_id = {"ca": "H-", "switch": "S-", "router": "R-"}[k] + guid[2:]
        node = dump.nodes.get(node_id)
        if node is None:
            node = DumpNode(node_id, k, guid, None, desc.strip(), lid=int(lid), line_no=i)
            dump.nodes[node_id] = node
        elif not node.description:
            node.description = desc.strip()
        return node

    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _PORTS_LINE.match(line)
        if m is None:
            if _DIAG.match(line):
                dump.warnings.append(f"line {i}: {line}")
                continue
            if _PROGRESS.match(line):
                continue
            raise IbParseError(source, i, "not an 'ibnetdiscover -p' line", raw)
        kind, lid, port_s, guid, width_s, speed, rest = m.groups()
        width = None if width_s == "??" else int(width_s[:-1])
        speed = speed.upper()
        if speed != "???" and speed not in LANE_RATE_GBPS:
            raise IbParseError(source, i, f"unknown link speed {speed!r}", raw)
        rest = rest.strip()
        peer = _PORTS_PEER.match(rest) if rest.startswith("-") else None
        if rest.startswith("-") and peer is None:
            raise IbParseError(source, i, "malformed peer part", raw)
        desc = peer.group(5) if peer else rest.strip("'")
        node = node_for(i, kind, lid, guid, desc)
        port = DumpPort(int(port_s), port_guid=node.guid, lid=int(lid))
        if peer is None or speed == "???":
            # unconnected or not yet trained: the port exists but carries no link
            port.connected = False
            port.width = width
            port.speed = None if speed == "???" else speed
            node.ports.setdefault(port.port, port)
            continue
        port.width, port.speed = width, speed
        node.ports.setdefault(port.port, port)
        pkind, plid, pport, pguid, _ldesc, rdesc = peer.groups()
        other = node_for(i, pkind, plid, pguid, rdesc)
        other.ports.setdefault(int(pport), DumpPort(int(pport), port_guid=other.guid,
                                                    lid=int(plid), width=width, speed=speed))
        a, b = sorted([(node.node_id, port.port), (other.node_id, int(pport))])
        if (a, b) not in seen_links:
            seen_links.add((a, b))
            dump.links.append(DumpLink(a[0], a[1], b[0], b[1], width, speed, i))
    return dump


def _parse_list(lines: list[str], source: str) -> IbDump:
    """`ibnetdiscover -l` (and `-H`, `-S`, `-R`): the nodes, with no cabling."""
    dump = IbDump(source, "list")
    prefix = {"Ca": ("H-", "ca"), "Switch": ("S-", "switch"), "Router": ("R-", "router")}
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#") or _PROGRESS.match(line):
            continue
        m = _LIST_LINE.match(line)
        if m is None:
            if _DIAG.match(line):
                dump.warnings.append(f"line {i}: {line}")
                continue
            raise IbParseError(source, i, "not an 'ibnetdiscover -l' node line", raw)
        kind_word, guid_text, nports, devid, vendid, desc = m.groups()
        try:
            guid = norm_guid(guid_text)
        except ValueError as e:
            raise IbParseError(source, i, str(e), raw) from e
        id_prefix, kind = prefix[kind_word]
        node_id = id_prefix + guid[2:]
        if node_id in dump.nodes:
            raise IbParseError(source, i, f"node {node_id!r} listed twice (first on line "
                                          f"{dump.nodes[node_id].line_no})", raw)
        dump.nodes[node_id] = DumpNode(node_id, kind, guid, int(nports), desc, line_no=i,
                                       vendid=vendid.lower(), devid=devid.lower())
    return dump
