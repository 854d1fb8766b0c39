#!/usr/bin/env bash
# The registry's PostgreSQL tests need a server on 127.0.0.1:5432; start the local cluster if it
# is installed but stopped. Prints where it stands; never fails the run by itself (the tests
# report clearly when the server is missing).
set -uo pipefail
if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "postgresql: accepting connections on 127.0.0.1:5432"
  exit 0
fi
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>&1 || true
  for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && { echo "postgresql: started cluster $version"; exit 0; }
    sleep 1
  done
fi
echo "postgresql: no server on 127.0.0.1:5432 (set MLMESH_TEST_POSTGRES_DSN to use another)" >&2
exit 0
