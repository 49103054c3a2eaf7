#!/usr/bin/env bash
# Installs Debian's slurm-wlm (slurmctld, slurmd, sbatch, srun) for
# tests/slurm.rs, which starts a one-node cluster of its own on this machine.
# Does nothing when slurmctld is already installed.
set -euo pipefail
command -v slurmctld >/dev/null && exit 0
command -v apt-get >/dev/null || { echo "install-slurm: needs Debian's apt-get; install slurm-wlm by hand" >&2; exit 1; }
sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "install-slurm: not root and no sudo: install slurm-wlm" >&2; exit 1; }
    sudo=(sudo)
fi
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600)
"${apt[@]}" update >/dev/null
"${apt[@]}" install -y --no-install-recommends slurm-wlm >/dev/null
command -v slurmctld >/dev/null
