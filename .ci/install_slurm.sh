#!/usr/bin/env bash
# CI: install a single-node Slurm (Debian's slurm-wlm: slurmctld + slurmd + client tools) and munge
# for tests/test_slurm.py. Idempotent. Always exits 0: where the install fails, the test skips and
# says why, and the rest of the suite still runs.
set -u
need=()
for bin in sbatch slurmctld slurmd munged mungekey; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "install_slurm: slurm-wlm and munge already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install_slurm: not root and no sudo; cannot install slurm-wlm munge (tests/test_slurm.py will skip)"
    exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
# Package scripts must not try to start daemons in a container without an init system: the test
# starts its own munged/slurmctld/slurmd under a temporary directory.
if $SUDO apt-get update -qq >/dev/null \
   && $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; then
    echo "install_slurm: installed slurm-wlm and munge"
else
    echo "install_slurm: apt-get install slurm-wlm munge failed (tests/test_slurm.py will skip)"
fi
exit 0
