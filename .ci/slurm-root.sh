#!/usr/bin/env bash
# Build (or reuse) a Debian root holding a newer Slurm for the real-Slurm tests, and print its
# path. Debian bookworm (the host) has Slurm 22.05; trixie has 24.11 and sid 26.05.
#
#   bash .ci/slurm-root.sh trixie|sid           -> /var/cache/gpufleet/slurm-roots/<suite>-<key>
#   bash .ci/slurm-root.sh --path trixie|sid    -> that path if it is built (exit 1 if not);
#                                                  never builds (what the test harness calls)
#
# Roots are cached on disk, keyed by suite and the package lists below; a root older than
# GPUFLEET_ROOT_MAX_AGE_DAYS (default 14) is rebuilt so a moved suite is picked up, and its
# stamp records the Slurm version it holds. A root is only ever replaced by one with the same
# key; roots with other keys (older package lists) are left alone, since another checkout may
# be using them. Needs root and debootstrap.
#
# Two steps: debootstrap makes a bare minbase root; apt-get inside it installs Slurm, with a
# policy-rc.d that keeps package scripts from starting daemons, and resolves alternatives and
# configure order better than debootstrap --include.
set -euo pipefail
mode=build
if [ "${1:-}" = "--path" ]; then mode=path; shift; fi
suite="${1:?usage: slurm-root.sh [--path] trixie|sid}"
case "$suite" in trixie|sid|forky) ;; *) echo "slurm-root: unknown suite '$suite' (trixie|sid|forky)" >&2; exit 2;; esac
cache="${GPUFLEET_ROOT_CACHE:-/var/cache/gpufleet/slurm-roots}"
mirror="${GPUFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
max_age_days="${GPUFLEET_ROOT_MAX_AGE_DAYS:-14}"
# the daemons, the clients, the basic plugins (cons_tres, topology tree/block, cli_filter/lua,
# openapi), slurmdbd with its MySQL plugin, munge (libmunge; the host's munged serves the labs),
# slurmrestd, auth/jwt, a Lua for cli_filter/job_submit scripts, python3 (the unit tests on
# the root's Python)
packages=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins slurmdbd slurm-wlm-mysql-plugin
          munge procps slurmrestd slurm-wlm-jwt-plugin lua5.3 python3)
key="$(printf '%s\n' "$suite" minbase "${packages[@]}" | sha256sum | cut -c1-12)"
root="$cache/$suite-$key"
stamp="$root/.gpufleet-root"
if [ "$mode" = path ]; then
  [ -f "$stamp" ] || { echo "slurm-root: no $suite root at $root (build it: bash .ci/slurm-root.sh $suite)" >&2; exit 1; }
  echo "$root"; exit 0
fi
if [ -f "$stamp" ] && [ -z "$(find "$stamp" -mtime +"$max_age_days" 2>/dev/null)" ]; then
  echo "slurm-root: $suite root cached ($(grep '^slurm=' "$stamp")): $root" >&2
  echo "$root"; exit 0
fi
if [ -f "$stamp" ] && grep -q " $root/" /proc/self/mounts; then
  # a lab is running in it (its bind mounts): never delete under a running lab
  echo "slurm-root: $suite root is stale but in use (mounts under $root); keeping it" >&2
  echo "$root"; exit 0
fi
command -v debootstrap >/dev/null || { echo "slurm-root: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.build-$suite-XXXXXX")"
# mktemp -d makes it 0700: then no user but root can reach the root's /bin/sh, and munge's
# postinst (su munge -c ...) fails with "failed to execute /bin/sh: Permission denied"
chmod 755 "$tmp"
logf="$cache/build-$suite-$key.log"
: >"$logf"
cleanup() { for m in proc; do umount "$tmp/$m" 2>/dev/null || true; done; rm -rf --one-file-system "$tmp"; }
trap cleanup EXIT
start=$(date +%s)
echo "slurm-root: [1/3] debootstrap --variant=minbase $suite into $tmp; log $logf ..." >&2
debootstrap --variant=minbase "$suite" "$tmp" "$mirror" >>"$logf" 2>&1 \
  || { cat "$tmp/debootstrap/debootstrap.log" >>"$logf" 2>/dev/null; tail -20 "$logf" >&2
       echo "slurm-root: debootstrap failed; read $logf" >&2; exit 1; }
t1=$(date +%s)
echo "slurm-root: [1/3] done in $((t1 - start)) s" >&2
echo "slurm-root: [2/3] apt-get install ${packages[*]} in the root ..." >&2
# no service starts inside the root (the tests start their own daemons)
printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"; chmod 755 "$tmp/usr/sbin/policy-rc.d"
mount -t proc proc "$tmp/proc"
chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  "${packages[@]}" >>"$logf" 2>&1 \
  || { tail -20 "$logf" >&2; echo "slurm-root: apt-get in the root failed; read $logf" >&2; exit 1; }
chroot "$tmp" apt-get clean >>"$logf" 2>&1 || true
umount "$tmp/proc"
t2=$(date +%s)
echo "slurm-root: [2/3] done in $((t2 - t1)) s" >&2
echo "slurm-root: [3/3] checking the root ..." >&2
version="$(chroot "$tmp" slurmctld -V | awk '{print $2}')"
for f in usr/sbin/slurmrestd usr/sbin/slurmdbd usr/bin/sinfo usr/bin/lua5.3 \
         usr/lib/x86_64-linux-gnu/slurm-wlm/auth_jwt.so usr/lib/x86_64-linux-gnu/slurm-wlm/cli_filter_lua.so \
         usr/lib/x86_64-linux-gnu/slurm-wlm/topology_block.so; do
  [ -e "$tmp/$f" ] || { echo "slurm-root: the $suite root has no /$f" >&2; exit 1; }
done
{
  printf 'suite=%s\nslurm=%s\nbuilt=%s\nbuild_s=%s\n' "$suite" "$version" "$(date -u +%FT%TZ)" "$(( $(date +%s) - start ))"
  printf 'packages=%s\n' "${packages[*]}"
  chroot "$tmp" dpkg-query -W -f='${Package}=${Version}\n' "${packages[@]}" | sed 's/^/pkg /'
} >"$tmp/.gpufleet-root"
if [ -e "$root" ]; then mv "$root" "$root.old.$$"; rm -rf --one-file-system "$root.old.$$"; fi
mv "$tmp" "$root"; trap - EXIT
echo "slurm-root: $suite root with Slurm $version ready in $(( $(date +%s) - start )) s, $(du -sm "$root" | cut -f1) MB: $root" >&2
echo "$root"
