#!/bin/sh
# Debian packages some tests need: headless Chromium (report screenshots) and a single-node
# Slurm with munge (the cluster test). Installed only when missing and when we are root;
# otherwise the tests that need them skip and say why.
set -u
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium chromium-driver"
command -v slurmctld >/dev/null 2>&1 || need="$need slurm-wlm"
command -v munged >/dev/null 2>&1 || need="$need munge"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: not root or no apt-get; tests needing:$need will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $need >/dev/null \
    || echo "install_system_deps: apt-get failed; tests needing:$need will skip" >&2
exit 0
