#!/usr/bin/env bash
# Build (or reuse) a Debian root holding a newer Slurm for the real-Slurm tests, and print its
# path. Debian bookworm (the host) has Slurm 22.05; trixie has 24.11 and sid 26.05.
#
#   bash .ci/slurm-root.sh trixie|sid     -> /var/cache/gpufleet/slurm-roots/<suite>-<key>
#
# Roots are cached on disk, keyed by suite and the package list below; a root older than
# GPUFLEET_ROOT_MAX_AGE_DAYS (default 14) is rebuilt so a moved suite is picked up, and its
# stamp records the Slurm version it holds. Needs root and debootstrap.
set -euo pipefail
suite="${1:?usage: slurm-root.sh trixie|sid}"
case "$suite" in trixie|sid|forky) ;; *) echo "slurm-root: unknown suite '$suite' (trixie|sid|forky)" >&2; exit 2;; esac
cache="${GPUFLEET_ROOT_CACHE:-/var/cache/gpufleet/slurm-roots}"
mirror="${GPUFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
max_age_days="${GPUFLEET_ROOT_MAX_AGE_DAYS:-14}"
packages=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins slurmrestd slurmdbd munge
          slurm-wlm-jwt-plugin lua5.3 liblua5.3-0 python3 procps)
key="$(printf '%s\n' "$suite" "${packages[@]}" | sha256sum | cut -c1-12)"
root="$cache/$suite-$key"
stamp="$root/.gpufleet-root"
if [ -f "$stamp" ] && [ -z "$(find "$stamp" -mtime +"$max_age_days" 2>/dev/null)" ]; then
  echo "$root"; exit 0
fi
command -v debootstrap >/dev/null || { echo "slurm-root: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.build-$suite-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
echo "slurm-root: debootstrap $suite into $tmp (a minute or two) ..." >&2
inc="$(IFS=,; echo "${packages[*]}")"
if ! debootstrap --variant=minbase --include="$inc" "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1; then
  # jwt/lua package names move between suites: retry with only what Slurm itself needs
  echo "slurm-root: full package list failed (see $tmp.log); retrying without optional packages" >&2
  rm -rf "$tmp"; mkdir -p "$tmp"
  debootstrap --variant=minbase --include=slurmctld,slurmd,slurm-client,slurm-wlm-basic-plugins,slurmdbd,munge,procps \
    "$suite" "$tmp" "$mirror" >>"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }
fi
version="$(chroot "$tmp" slurmctld -V | awk '{print $2}')"
printf 'suite=%s\nslurm=%s\nbuilt=%s\n' "$suite" "$version" "$(date -u +%FT%TZ)" >"$tmp/.gpufleet-root"
rm -rf "$root"; mv "$tmp" "$root"; trap - EXIT; rm -f "$tmp.log"
echo "slurm-root: $suite root with Slurm $version ready in $(( $(date +%s) - start )) s" >&2
echo "$root"
