#!/usr/bin/env bash
# Install the Debian packages of a single-machine SLURM cluster (tests/test_slurm.py runs it), without
# letting the packages start their daemons: the test starts its own, with its own config.
# Needs root and apt; about 10 s. Does nothing if slurmctld is already installed.
set -euo pipefail
command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "SLURM not installed and cannot be (needs root and apt-get)" >&2
  exit 1
fi
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
