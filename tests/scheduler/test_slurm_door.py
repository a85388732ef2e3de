"""One door to Slurm: no module outside gpufleet.scheduler.slurm runs a Slurm command, talks
to slurmrestd or pyslurm, or reads what they print.

Checked on the source (ast) of gpufleet's packages and bench/: an argv whose first word is a
Slurm command (a list or tuple literal, or the first argument of a call), `import pyslurm`,
a slurmrestd URL path, and the field names of Slurm's JSON. Any such thing outside the
package fails this test with the file, the line and what was found: move it into the
package (or call the package) instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "scheduler" / "gpufleet" / "scheduler" / "slurm"
ROOTS = [REPO / "scheduler" / "gpufleet", REPO / "agent" / "gpufleet", REPO / "bench"]
SLURM_COMMANDS = frozenset({
    "sinfo", "scontrol", "squeue", "sbatch", "sacct", "scancel", "srun", "salloc",
    "sacctmgr", "sreport", "sshare", "sprio", "sstat", "sdiag", "strigger", "scrontab",
    "slurmrestd"})
# fields only Slurm's JSON has: reading one means parsing Slurm's output
SLURM_FIELDS = frozenset({
    "state_flags", "job_state", "gres_detail", "alloc_cpus", "restart_cnt", "batch_flag",
    "excluded_nodes", "state_reason", "data_parser", "features_act", "tres_alloc_str"})


# Known exceptions, each with its reason. They run a Slurm command but parse nothing of what it
# prints; importing the package costs ~90 ms, more than their whole budget.
EXCEPTIONS = {
    # `gpufleet sbatch`: execs the real sbatch before click or anything else is imported
    REPO / "scheduler" / "gpufleet" / "scheduler" / "cli" / "entry.py",
    # runs inside Slurm's cli_filter/lua on every submission (stdlib only, <= 150 ms budget);
    # its `scontrol update ReqNodeList=` releases a pin the filter itself added
    REPO / "scheduler" / "gpufleet" / "scheduler" / "cli" / "sbatch_filter.py",
    # the baseline of the sbatch overhead bench is plain sbatch, run as a user runs it
    REPO / "bench" / "sbatch_overhead.py",
}


def _sources() -> list[Path]:
    out = []
    for root in ROOTS:
        out += [p for p in root.rglob("*.py")
                if PACKAGE not in p.parents and p not in EXCEPTIONS]
    return sorted(out)


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(REPO) if REPO in path.parents else path
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = _str(node.elts[0])
            if first in SLURM_COMMANDS:
                found.append(f"{where}: argv of {first!r}")
        elif isinstance(node, ast.Call) and node.args:
            first = _str(node.args[0])
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            # click.command("sbatch") names a CLI command; it runs nothing
            if first in SLURM_COMMANDS and name not in {"command", "group", "option"}:
                found.append(f"{where}: {name}({first!r}, ...)")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            if any(m.split(".")[0] == "pyslurm" for m in mods):
                found.append(f"{where}: imports pyslurm")
        elif (text := _str(node)) is not None:
            if text in SLURM_FIELDS:
                found.append(f"{where}: reads Slurm's JSON field {text!r}")
            elif text.startswith("/slurm/v0.0.") or text.startswith("/openapi/v3"):
                found.append(f"{where}: slurmrestd path {text!r}")
    return found


def test_no_slurm_outside_the_slurm_package() -> None:
    sources = _sources()
    assert len(sources) > 50, "the scan found too few files to mean anything"
    bad = [o for p in sources for o in offences(p)]
    assert bad == [], "Slurm outside gpufleet.scheduler.slurm:\n" + "\n".join(bad)


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scan is not vacuous: each kind of offence is found (click.command('sbatch') is
    not one), and the package itself has what the scan looks for."""
    text = (
        "import subprocess\nimport pyslurm\n"
        "subprocess.run(['scontrol', 'show', 'nodes', '--json'])\n"
        "run('squeue', '--json')\n"
        "state = doc['nodes'][0]['state_flags']\n"
        "url = '/slurm/v0.0.42/nodes'\n"
        "click.command('sbatch')\n"
    )
    mod = tmp_path / "probe.py"
    mod.write_text(text)
    kinds = sorted(f.split(": ", 1)[1] for f in offences(mod))
    assert kinds == ["argv of 'scontrol'", "imports pyslurm",
                     "reads Slurm's JSON field 'state_flags'", "run('squeue', ...)",
                     "slurmrestd path '/slurm/v0.0.42/nodes'"], kinds
    inside = [p for p in PACKAGE.rglob("*.py") if offences(p)]
    assert inside, "the package itself must have what the scan looks for"
