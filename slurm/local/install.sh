#!/usr/bin/env bash
# Install a one-node SLURM (munge, slurmctld, slurmd, client tools) on Debian, for tests and development.
# Idempotent: installs only what is missing. Needs root. Usage: bash slurm/local/install.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[[ "$(id -u)" == 0 ]] || { echo "slurm/local/install.sh needs root (apt-get, munge key, daemons)" >&2; exit 1; }

# one install at a time: the one-node and the two-node test clusters may start together
exec 9>/run/lejepa-slurm-install.lock
flock 9

# 8 packages, ~3.5 MB; the slurm-wlm metapackage would pull 43
missing=0
for tool in slurmctld slurmd munged sbatch; do command -v "$tool" >/dev/null || missing=1; done
if [[ $missing == 1 ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

# slurmd and torch's MASTER_ADDR resolve this host's name
host="$(hostname -s)"
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts

# Debian's postinst writes the munge key; make one if it is missing
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge

# no slurmdbd here: a stand-in answers submitit's sacct queries from `scontrol show job`
install -m 0755 "$here/sacct" /usr/local/bin/sacct
