"""What each NVIDIA Xid means for a node: fatal or not, and what resolves it.

Written from NVIDIA's public Xid documentation ("Analyzing Xid Errors with the Xid Catalog",
docs.nvidia.com/deploy/xid-errors): its severity (fatal: the GPU or node must leave service)
and its immediate resolution, per Xid and, for the NVLink5 Xids 144-150, per variant: the
driver's kernel line for those names a unit and carries an "intrinfo" word (unit code in the
low bits, a reason in bits 20-25) and an error status word, and the same Xid is fatal for some
statuses and a warning for others. The conformance suite (tests/conformance) checks this table
against NVIDIA's machine-readable catalog, Xid by Xid and variant by variant.

Pure data and lookups: no I/O, no NVML, nothing that acts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "NVLINK5_UNITS",
    "XID_CATALOG",
    "Nvlink5Unit",
    "Resolution",
    "XidClass",
    "XidEntry",
    "classify",
    "variant_dependent",
]


class Resolution(StrEnum):
    """The immediate action NVIDIA recommends; the repair loop acts on it."""

    NONE = "NONE"  # nothing to do (the catalog's IGNORE): informational or already handled
    RESTART_APP = "RESTART_APP"  # the application's fault or a contained error: rerun it
    RESET_GPU = "RESET_GPU"  # drain, reset the GPU (nvidia-smi -r), check, resume
    RESTART_VM = "RESTART_VM"  # restart the virtual machine the GPU is passed to
    REBOOT = "REBOOT"  # restart the bare-metal node (the catalog's RESTART_BM)
    CONTACT_SUPPORT = "CONTACT_SUPPORT"  # not expected on this hardware: report it to NVIDIA
    UPDATE_SWFW = "UPDATE_SWFW"  # driver / firmware mismatch: update them
    CHECK_MECHANICALS = "CHECK_MECHANICALS"  # power cabling of the board
    CHECK_UVM = "CHECK_UVM"  # unified memory (CPU-GPU coherent link) error: check the app
    WORKFLOW_XID_45 = "WORKFLOW_XID_45"  # follow-on of another Xid; alone: restart the FM
    WORKFLOW_XID_48 = "WORKFLOW_XID_48"  # double-bit ECC: reset, then check row remapping
    WORKFLOW_NVLINK = "WORKFLOW_NVLINK"  # NVLink error: reset; repeated on a link: service
    WORKFLOW_NVLINK5 = "WORKFLOW_NVLINK5"  # NVLink5 Xid whose variant is not known
    FOLLOW_XID_154 = "FOLLOW_XID_154"  # do what the driver's Xid 154 recovery action says


@dataclass(frozen=True, slots=True)
class XidEntry:
    fatal: bool
    resolution: Resolution
    about: str  # our one-line description


@dataclass(frozen=True, slots=True)
class XidClass:
    """One Xid occurrence, classified: base entry, or the variant its kernel line names."""

    xid: int
    fatal: bool
    resolution: Resolution
    about: str
    variant: str = ""  # "NETIR_LINK_EVT status 0x0 reason 37", "recovery action 0x1" ...
    known: bool = True  # False: not in the catalog, or a variant the catalog does not list


def _group(xids: str, fatal: bool, resolution: Resolution, about: str
           ) -> dict[int, XidEntry]:
    """'1-7 9 10' -> one entry per Xid."""
    out: dict[int, XidEntry] = {}
    for part in xids.split():
        lo, _, hi = part.partition("-")
        for x in range(int(lo), int(hi or lo) + 1):
            out[x] = XidEntry(fatal, resolution, about)
    return out


R = Resolution
XID_CATALOG: dict[int, XidEntry] = {
    # Codes current data-center GPUs should never log: unused, legacy engines, display: the
    # catalog asks for a report; treated as fatal since nothing says the GPU is sound.
    **_group("1-7 9 10 12 15-24 26-30 33-36 42 47 49-53 55 59 87 90 91 108 122-125 138",
             True, R.CONTACT_SUPPORT, "code unused by current drivers"),
    **_group("56 111-118", True, R.CONTACT_SUPPORT, "display engine error"),
    **_group("57 58", True, R.CONTACT_SUPPORT, "video memory interface error"),
    **_group("61", True, R.CONTACT_SUPPORT, "internal micro-controller breakpoint"),
    **_group("65 73 142", True, R.CONTACT_SUPPORT, "video encoder/processor exception"),
    **_group("81", True, R.CONTACT_SUPPORT, "VGA subsystem error"),
    # The application's fault, or an error contained to it: rerun it, the GPU is fine.
    **_group("8", False, R.RESTART_APP, "channel idle timeout: GPU stopped processing"),
    **_group("11 25 32", False, R.RESTART_APP, "invalid or corrupted push buffer stream"),
    **_group("13", False, R.RESTART_APP, "graphics engine exception"),
    **_group("31", False, R.RESTART_APP, "GPU memory page fault (MMU)"),
    **_group("39-41 70-72 75-77 85 126-135", False, R.RESTART_APP, "copy engine exception"),
    **_group("60 68 83 84 88 89 96-98", False, R.RESTART_APP, "video decoder exception"),
    **_group("69", False, R.RESTART_APP, "graphics engine class error"),
    **_group("80", False, R.RESTART_APP, "corrupted data sent to the GPU"),
    **_group("82 99-105", False, R.RESTART_APP, "JPEG decoder exception"),
    **_group("86 139", False, R.RESTART_APP, "optical flow accelerator exception"),
    **_group("94", False, R.RESTART_APP, "contained memory error"),
    # Informational, or already handled by the driver.
    **_group("14", False, R.NONE, "driver test error"),
    **_group("37 38", False, R.NONE, "driver firmware error"),
    **_group("43", False, R.NONE, "channel reset after an application fault"),
    **_group("44", False, R.NONE, "graphics engine fault during context switch"),
    **_group("63", False, R.NONE, "memory row remapping / page retirement recorded"),
    **_group("66 67", False, R.NONE, "illegal access by the driver"),
    **_group("92", False, R.NONE, "high single-bit ECC error rate"),
    **_group("93", False, R.NONE, "InfoROM wear limit exceeded (non-fatal)"),
    **_group("106 107", False, R.NONE, "SMBPBI test message"),
    **_group("121", False, R.NONE, "C2C link error"),
    **_group("137", False, R.NONE, "NVLink privilege error"),
    **_group("141", False, R.NONE, "CUDA fast path error"),
    **_group("152 153", False, R.NONE, "DLA error"),
    **_group("157", False, R.NONE, "resource retirement failure"),
    **_group("161", False, R.NONE, "channel retirement failure"),
    # The GPU needs a reset before it can be trusted again.
    **_group("46", True, R.RESET_GPU, "GPU stopped processing"),
    **_group("62", True, R.RESET_GPU, "internal micro-controller halt"),
    **_group("64", True, R.RESET_GPU, "memory row remapping / page retirement failed"),
    **_group("95", True, R.RESET_GPU, "uncontained memory error"),
    **_group("109", True, R.RESET_GPU, "context switch timeout"),
    **_group("110", True, R.RESET_GPU, "security fault"),
    **_group("119", True, R.RESET_GPU, "GSP RPC timeout"),
    **_group("120", True, R.RESET_GPU, "GSP error"),
    **_group("136", True, R.RESET_GPU, "link training failed"),
    **_group("140", True, R.RESET_GPU, "unrecovered ECC error"),
    **_group("143", True, R.RESET_GPU, "GPU initialization error"),
    **_group("155", True, R.RESET_GPU, "NVLink software-defined error"),
    **_group("156", True, R.RESET_GPU, "resource retirement event"),
    **_group("158", True, R.RESET_GPU, "GPU fatal timeout"),
    **_group("162", True, R.RESET_GPU, "Xid 162"),
    # Workflows and the rest.
    **_group("45", False, R.WORKFLOW_XID_45, "preemptive cleanup after an earlier error"),
    **_group("48", True, R.WORKFLOW_XID_48, "double-bit ECC error"),
    **_group("54", True, R.CHECK_MECHANICALS, "auxiliary power not connected"),
    **_group("74", True, R.WORKFLOW_NVLINK, "NVLink error"),
    **_group("78", True, R.UPDATE_SWFW, "vGPU start error"),
    **_group("79", True, R.REBOOT, "GPU has fallen off the bus"),
    **_group("160", True, R.REBOOT, "channel retirement event"),
    **_group("144-150", True, R.WORKFLOW_NVLINK5, "NVLink5 error"),
    **_group("151", True, R.RESTART_VM, "key rotation error"),
    **_group("154", False, R.FOLLOW_XID_154, "GPU recovery action changed"),
    **_group("159", False, R.CHECK_UVM, "CHI non-data error"),
}
del R


# ---------------------------------------------------------------- NVLink5 (Xid 144-150)


@dataclass(frozen=True, slots=True)
class Nvlink5Unit:
    """One unit of the NVLink5 decode: how its intrinfo word reads, and per error status
    what it means. `reasons`: the values of intrinfo bits 20-25 this row covers (the
    link-down reason of NETIR_LINK_EVT); () for rows that require 0."""

    xid: int
    unit: str
    code_v1: int  # intrinfo bits 0-9 on drivers that encode the unit there
    code_v2: int  # intrinfo bits 0-6 on later drivers
    statuses: dict[int, tuple[bool, Resolution]]  # error status word -> (fatal, resolution)
    reasons: tuple[int, ...] = ()


_OK = (False, Resolution.NONE)
_RESET = (True, Resolution.RESET_GPU)
_EVAL = (False, Resolution.FOLLOW_XID_154)
_SW = 0x8000_0000  # status bit 31: a software-reported event, never fatal in the catalog


def _tlw(unit: str, code_v1: int, code_v2: int) -> Nvlink5Unit:
    # transaction-layer units: bit 2 of the status is the fatal one
    return Nvlink5Unit(146, unit, code_v1, code_v2, {1: _OK, 2: _OK, 4: _RESET, _SW: _OK})


# link-down reasons (intrinfo bits 20-25) the catalog lists for NETIR_LINK_EVT: fatal to the
# link; all reset the GPU except 0x26 (software or user cause) and 0x28 (host cause)
_LINK_DOWN_RESET = (0x00, 0x01, 0x02, 0x04, 0x0A, 0x0F, 0x10, 0x11, 0x12, 0x15, 0x16, 0x20,
                    0x21, 0x22, 0x23, 0x24, 0x25, 0x2A, 0x2B)

NVLINK5_UNITS: tuple[Nvlink5Unit, ...] = (
    Nvlink5Unit(144, "SAW_MVB", 0x021, 0x01,
                {1: _OK, 2: _RESET, 4: _OK, 8: _OK, 0x10: _RESET, 0x20: _OK}),
    Nvlink5Unit(145, "RLW_CTRL", 0x062, 0x03, {_SW: _OK}),
    Nvlink5Unit(145, "RLW_REMAP", 0x082, 0x04,
                {1: _EVAL, 2: _EVAL, 4: _EVAL, 8: _EVAL, 0x10: _EVAL, 0x20: _EVAL,
                 0x40: _RESET, 0x80: _RESET, 0x100: _OK, 0x200: _OK, _SW: _OK}),
    Nvlink5Unit(145, "RLW_RSPCOL", 0x0A2, 0x05, {1: _OK, 2: _RESET, _SW: _OK}),
    Nvlink5Unit(145, "RLW_RXPIPE", 0x0C2, 0x06, {1: _OK, 2: _OK, 4: _OK, 8: _OK, _SW: _OK}),
    Nvlink5Unit(145, "RLW_SRC_TRACK", 0x0E2, 0x07,
                {1: _RESET, 2: _OK, 4: _EVAL, 8: _EVAL, 0x10: _RESET, 0x20: _RESET,
                 _SW: _OK}),
    Nvlink5Unit(145, "RLW_TAGSTATE", 0x102, 0x08,
                {1: _OK, 2: _RESET, 0x10000: _OK, 0x20000: _RESET, 0x100000: _RESET,
                 _SW: _OK}),
    _tlw("TLW_CTRL", 0x123, 0x09),
    _tlw("TLW_RX_PIPE0", 0x143, 0x0A),
    _tlw("TLW_RX_PIPE1", 0x143, 0x0B),
    _tlw("TLW_TX_PIPE0", 0x163, 0x0C),
    _tlw("TLW_TX_PIPE1", 0x163, 0x0D),
    Nvlink5Unit(147, "TREX", 0x184, 0x0E, {1: _OK, _SW: _OK}),
    Nvlink5Unit(148, "NVLPW_CTRL", 0x005, 0x0F, {_SW: _OK}),
    Nvlink5Unit(149, "NETIR_INT", 0x006, 0x18, {0: _RESET}),
    Nvlink5Unit(149, "NETIR_BER_EVENT", 0x226, 0x13, {0: _OK, 1: _OK, 2: _OK, 3: _OK}),
    Nvlink5Unit(149, "NETIR_LINK_EVT", 0x1C6, 0x11, {0: _RESET}, _LINK_DOWN_RESET),
    Nvlink5Unit(149, "NETIR_LINK_EVT", 0x1C6, 0x11, {0: (True, Resolution.NONE)}, (0x26, 0x28)),
    Nvlink5Unit(149, "NETIR_MFDE_EVENT", 0x246, 0x14,
                {1: _RESET, 3: _OK, 4: _RESET, 5: _RESET, 7: _RESET}),
    Nvlink5Unit(150, "MSE_WATCHDOG", 0x000, 0x00, {0: _RESET}),
)

# "<UNIT> <Fatal|Nonfatal> XC0 i0 Link 09 (0x025525c6 0x00000000 ...)" after "NNN, "
_NVLINK5_LINE = re.compile(
    r"(?P<unit>[A-Z][A-Z0-9_/]*)\s+(?P<sev>[Ff]atal|[Nn]on-?[Ff]atal)\b.*?Link\s+(?P<link>-?\d+)"
    r"(?:\s*\(\s*(?P<intr>0x[0-9a-fA-F]+)(?:[\s,]+(?P<status>0x[0-9a-fA-F]+))?)?")
# "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)"
_RECOVERY = re.compile(r"recovery action changed from\s+\S+.*?\bto\s+(0x[0-9a-fA-F]+|\d+)",
                       re.IGNORECASE)
_RECOVERY_ACTION = {  # NVML's nvmlDeviceGpuRecoveryAction_t values
    0: (Resolution.NONE, "none"),
    1: (Resolution.RESET_GPU, "GPU reset required"),
    2: (Resolution.REBOOT, "node reboot required"),
    3: (Resolution.RESTART_APP, "drain peer-to-peer traffic"),
    4: (Resolution.RESET_GPU, "drain and reset"),
}


def variant_dependent(xid: int) -> bool:
    """True for the Xids whose meaning depends on the text of the driver's kernel line."""
    return 144 <= xid <= 150 or xid == 154


def _units_for(xid: int, intrinfo: int) -> list[Nvlink5Unit]:
    reason = (intrinfo >> 20) & 0x3F
    rows = [u for u in NVLINK5_UNITS if u.xid == xid and reason in (u.reasons or (0,))]
    v1 = [u for u in rows if u.code_v1 == intrinfo & 0x3FF]
    return v1 or [u for u in rows if u.code_v2 == intrinfo & 0x7F]


def _nvlink5(xid: int, message: str, base: XidEntry) -> XidClass:
    m = _NVLINK5_LINE.search(message)
    if m is None:
        # NVML's event, or a line in no form we know: the variant decides, and is unknown
        return XidClass(xid, False, Resolution.WORKFLOW_NVLINK5, base.about,
                        "variant unknown (no kernel log line)", known=False)
    driver_fatal = m.group("sev").lower() == "fatal"
    unit_word = m.group("unit")
    if m.group("intr") is None:
        return XidClass(xid, driver_fatal, Resolution.WORKFLOW_NVLINK5, base.about,
                        f"{unit_word} (no intrinfo; the driver says "
                        f"{m.group('sev').lower()})", known=False)
    intrinfo = int(m.group("intr"), 16)
    status = int(m.group("status"), 16) if m.group("status") else 0
    where = f"{unit_word} link {m.group('link')} intrinfo {intrinfo:#010x} status {status:#x}"
    units = _units_for(xid, intrinfo)
    # units sharing an encoding (TLW_RX pipes 0 and 1 in the older one): the named one first
    units.sort(key=lambda u: unit_word not in u.unit)
    for unit in units:
        hits = ([unit.statuses[status]] if status in unit.statuses else
                [v for bit, v in unit.statuses.items() if bit and status & bit == bit])
        if hits:
            # several status bits at once: the worst of them
            fatal, res = max(hits, key=lambda h: (h[0], h[1] == Resolution.RESET_GPU))
            return XidClass(xid, fatal, res, base.about, f"{unit.unit}: {where}")
    return XidClass(xid, driver_fatal, Resolution.WORKFLOW_NVLINK5, base.about,
                    f"{where} (not in the catalog; the driver says {m.group('sev').lower()})",
                    known=False)


def classify(xid: int, message: str = "") -> XidClass:
    """Fatal or not, and the resolution, of one Xid; `message` is the text after the Xid
    number in the driver's kernel line ("" when NVML reported it)."""
    base = XID_CATALOG.get(xid)
    if base is None:
        return XidClass(xid, False, Resolution.CONTACT_SUPPORT, "not in the catalog",
                        known=False)
    if 144 <= xid <= 150:
        return _nvlink5(xid, message, base)
    if xid == 154 and (m := _RECOVERY.search(message)):
        action = int(m.group(1), 0)
        res, words = _RECOVERY_ACTION.get(action, (Resolution.FOLLOW_XID_154,
                                                   f"action {action:#x}"))
        return XidClass(xid, base.fatal, res, base.about, f"recovery action: {words}")
    return XidClass(xid, base.fatal, base.resolution, base.about)
