#!/usr/bin/env bash
# Makes sure Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database
# `test`) are reachable for the store tests: starts them when installed but
# stopped, installs them from Debian's packages when missing, and says so.
set -euo pipefail

say() { echo "ensure-stores: $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

if ! redis_up; then
  if ! command -v redis-server >/dev/null; then
    say "Redis is not installed; installing redis-server from Debian's packages"
    as_root apt-get update -qq && as_root apt-get install -y -qq redis-server redis-tools
  fi
  say "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up && say "Redis ok" || { say "Redis still unreachable on 127.0.0.1:6379"; exit 1; }

if ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null; then
    say "PostgreSQL is not installed; installing postgresql from Debian's packages"
    as_root apt-get update -qq && as_root apt-get install -y -qq postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
fi
pg_up || { say "PostgreSQL still unreachable on 127.0.0.1:5432"; exit 1; }
if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
  say "creating database test"
  as_root su postgres -c "createdb test" 2>/dev/null || true
fi
say "PostgreSQL ok"
