"""What fixes a fault: NVIDIA's resolution for an XID or a check, on the controller side.

Keyed by the verdict's reason code ("xid79", "gpu_lost", ...), which is all the controller
gets. The agent's catalog (gpufleet.agent.xid_catalog) says which XIDs are fatal; this table
says what to do about the fatal ones. Unknown codes get NONE: no remediation, only the
diagnostic decides whether the node returns.

Merge note: when the agent's catalog carries a per-XID resolution (issue 18), the verdict can
carry it on the wire and this table becomes the fallback for older agents.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Resolution(StrEnum):
    RESET_GPU = "reset_gpu"  # the agent resets the GPU(s) once no process holds them
    REBOOT = "reboot"  # `scontrol reboot ASAP` through the site's RebootProgram
    CONTACT_SUPPORT = "contact_support"  # RMA class: never retried, escalated
    NONE = "none"  # nothing to run: diagnose, then resume or escalate


# XID -> resolution (NVIDIA XID catalog, "Resolution" column; XID_CATALOG's action names)
_XID: dict[int, Resolution] = {
    79: Resolution.REBOOT,  # GPU has fallen off the bus: RESTART_BM
    # RESET_GPU in NVIDIA's catalog
    46: Resolution.RESET_GPU, 62: Resolution.RESET_GPU, 95: Resolution.RESET_GPU,
    109: Resolution.RESET_GPU, 110: Resolution.RESET_GPU, 119: Resolution.RESET_GPU,
    120: Resolution.RESET_GPU, 136: Resolution.RESET_GPU, 140: Resolution.RESET_GPU,
    143: Resolution.RESET_GPU,
    # ECC workflow (48: DBE): a reset retires the page / applies the row remap; a remap
    # that then fails shows in the diagnostic (row_remap) and is escalated from there
    48: Resolution.RESET_GPU,
    63: Resolution.RESET_GPU,  # row remap / page retirement recorded: reset applies it
    64: Resolution.RESET_GPU,  # recording failed: reset; a repeat ends in quarantine
    # NVLink workflows: reset the GPU; links that stay down fail the diagnostic
    74: Resolution.RESET_GPU,
    **dict.fromkeys(range(144, 151), Resolution.RESET_GPU),
    54: Resolution.CONTACT_SUPPORT,  # CHECK_MECHANICALS: power/cooling hardware
}
# the agent's own checks (gpufleet.agent.health reason codes)
_CHECK: dict[str, Resolution] = {
    "gpu_lost": Resolution.REBOOT,
    "gpu_count": Resolution.REBOOT,
    "pcie_downtrained": Resolution.REBOOT,
    "ecc_dbe": Resolution.RESET_GPU,
    "row_remap_pending": Resolution.RESET_GPU,
    "row_remap_failure": Resolution.CONTACT_SUPPORT,  # no spare rows left: RMA
    "nvlink_down": Resolution.RESET_GPU,
}
_XID_RE = re.compile(r"^xid(\d+)$")


def resolve(reason_code: str) -> Resolution:
    """The resolution for a verdict's reason code ("xid79", "ecc_dbe", ...)."""
    m = _XID_RE.match(reason_code)
    if m:
        xid = int(m.group(1))
        res = _XID.get(xid)
        if res is not None:
            return res
        # fatal XIDs NVIDIA says to report (UNEXPECTED_ERR_REPORT_ISSUE) are not retried
        return Resolution.CONTACT_SUPPORT
    return _CHECK.get(reason_code, Resolution.NONE)
