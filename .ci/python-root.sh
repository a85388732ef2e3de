#!/usr/bin/env bash
# Run gpufleet's fast unit tests on the Python of a Slurm root (.ci/slurm-root.sh): trixie's
# 3.13 (issue 15: "the unit tests also pass on the Python of the newest root").
#
#   bash .ci/python-root.sh trixie [PYTEST ARGS...]   (default args: -m "not slurm and not slow" -q)
#
# The root must be built already (this never builds one: bash .ci/slurm-root.sh trixie). A
# virtual environment made with the root's own python3 holds gpufleet[dev], installed editable
# from this checkout; it is cached on disk beside the roots, keyed by the root (suite and
# package-list key), pyproject.toml and this checkout's path, so a second run only runs pytest.
#
# Everything runs in a private mount namespace (unshare -m): the bind mounts below vanish
# with it, and the labs that share the root (tests/slurm/roots.py) never see them. Mounted at
# the same path inside as outside: this checkout, the venv cache, /tmp, and the real-world
# corpus when it is there; /proc, /dev and /sys as usual; the host's promtool on PATH. Nothing is started inside (no munged,
# PostgreSQL or Slurm daemon): tests that need one are marked `slurm` or `slow`, or skip.
# Debian's root has no ensurepip (python3-venv is not installed), so the venv is made
# --without-pip and pip is bootstrapped from its wheel, downloaded from PyPI. Needs root.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
suite="${1:-}"
case "$suite" in
  trixie|sid|forky) shift ;;
  *) echo "python-root: unknown suite '$suite' (usage: python-root.sh trixie|sid|forky [PYTEST ARGS...])" >&2
     exit 2 ;;
esac
[ $# -gt 0 ] || set -- -m "not slurm and not slow" -q -p no:cacheprovider
# never builds a root; slurm-root.sh says how when there is none
root="$(bash "$repo/.ci/slurm-root.sh" --path "$suite")" || exit 1
py=python3
pyver="$(chroot "$root" "$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || { echo "python-root: the $suite root at $root has no working $py" >&2; exit 1; }
cache="${GPUFLEET_PYROOT_CACHE:-/var/cache/gpufleet/python-roots}"
key="$( { basename "$root"; echo "$pyver"; cat "$repo/pyproject.toml"; echo "$repo"; } | sha256sum | cut -c1-12)"
venv="$cache/$(basename "$root")-py$pyver-$key"
mkdir -p "$cache"

# in the namespace: mount, then chroot. $1 is the command to run inside (a bash string).
in_root() {
  local inner="$1"
  local real_data="${GPUFLEET_REAL_DATA:-$repo/../shared/data/real}"
  local binds=("$repo" "$cache" /tmp)
  local data=""
  if [ -d "$real_data" ]; then data="$(cd "$real_data" && pwd)"; binds+=("$data"); fi
  # host programs that need nothing but libc run inside as they are: promtool (Go; Alertmanager
  # would need its templates from /usr/share too: its two tests skip)
  local tools=()
  mkdir -p "$cache/hostbin"
  for t in promtool; do
    if p="$(command -v "$t")"; then touch "$cache/hostbin/$t"; tools+=("$p"); fi
  done
  unshare --mount --propagation private -- bash -euo pipefail -c '
    root=$1; inner=$2; hostbin=$3; data=$4; ntools=$5; shift 5
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    tools=("${@:1:ntools}"); shift "$ntools"
    for d in "$@"; do mkdir -p "$root$d"; mount --bind "$d" "$root$d"; done
    for t in "${tools[@]}"; do mount --bind "$t" "$root$hostbin/$(basename "$t")"; done
    # CI stays unset inside: tests that need a host daemon or tool the root lacks skip (they
    # run on the host in the main test run) instead of failing as CI=true would make them
    exec chroot "$root" /usr/bin/env -i \
      PATH="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin:$hostbin" \
      HOME=/root LANG=C.UTF-8 TMPDIR=/tmp ${data:+GPUFLEET_REAL_DATA="$data"} \
      /bin/bash -euo pipefail -c "$inner"
  ' in-root "$root" "$inner" "$cache/hostbin" "$data" "${#tools[@]}" "${tools[@]}" "${binds[@]}"
}

# one builder at a time per venv; a venv without its stamp is half made: start it again
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.gpufleet-venv" ]; then
  t0=$(date +%s)
  rm -rf --one-file-system "$venv"
  logf="$venv.log"
  echo "python-root: making a Python $pyver venv in the $suite root: $venv (log $logf) ..." >&2
  # pip's own wheel, fetched by the host's pip, installs pip into the venv from itself
  wheels="$(mktemp -d "$cache/.wheels-XXXXXX")"
  trap 'rm -rf --one-file-system "$wheels"' EXIT
  hostpy="$repo/.venv/bin/python"; [ -x "$hostpy" ] || hostpy=python3
  "$hostpy" -m pip download --disable-pip-version-check -q --no-deps -d "$wheels" pip >"$logf" 2>&1 \
    || { tail -5 "$logf" >&2; echo "python-root: could not download pip's wheel; read $logf" >&2; exit 1; }
  # pip inside trusts what the host trusts (the root has no ca-certificates; a site's proxy
  # may have its own CA): the host's bundle, copied into the cache for the build
  ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  pipcert=""
  if [ -f "$ca" ]; then cp "$ca" "$wheels/ca.crt"; pipcert="PIP_CERT='$wheels/ca.crt'"; fi
  in_root "
    export $pipcert
    $py -m venv --without-pip '$venv'
    whl=\$(ls '$wheels'/pip-*.whl)
    '$venv/bin/python' \$whl/pip install -q --no-index --disable-pip-version-check \$whl
    cd '$repo'
    '$venv/bin/python' -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]'
  " >>"$logf" 2>&1 \
    || { grep -E '^(ERROR|error)' "$logf" >&2 || tail -20 "$logf" >&2
         echo "python-root: making the venv (pip install -e .[dev] on Python $pyver) failed; read $logf" >&2
         exit 1; }
  printf 'root=%s\npython=%s\nrepo=%s\nbuilt=%s\nbuild_s=%s\n' "$root" "$pyver" "$repo" \
    "$(date -u +%FT%TZ)" "$(( $(date +%s) - t0 ))" >"$venv/.gpufleet-venv"
  rm -rf --one-file-system "$wheels"; trap - EXIT
  echo "python-root: venv ready in $(( $(date +%s) - t0 )) s" >&2
else
  echo "python-root: venv cached: $venv" >&2
fi
flock -u 9

echo "python-root: pytest on $(chroot "$root" "$py" --version) in the $suite root: $*" >&2
args="$(printf '%q ' "$@")"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
t0=$(date +%s)
rc=0
in_root "cd '$repo' && exec '$venv/bin/python' -m pytest $args" 2>&1 | tee "$out" || rc=$?
# pytest's last line ("N passed, M skipped in Xs"), said once more where a CI log reader looks
summary="$(grep -E '^=* ?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$out" | tail -1 | tr -d '=')"
echo "python-root: Python $pyver ($suite root): ${summary:-no pytest summary} (wall $(( $(date +%s) - t0 )) s, exit $rc)"
exit "$rc"
