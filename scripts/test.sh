#!/usr/bin/env bash
# The whole test suite, as CI runs it: servers, lint, types, import contracts, pytest.
# With CI=true a missing PostgreSQL fails the run instead of skipping its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

pg_ready() { "$BIN/python" - <<'PY'
import asyncio, sys
import asyncpg
async def main() -> None:
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=3)
    await conn.close()
try:
    asyncio.run(main())
except Exception as exc:  # noqa: BLE001
    print(f"PostgreSQL not answering: {exc}", file=sys.stderr)
    sys.exit(1)
PY
}

if ! pg_ready; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_ready 2>/dev/null && break; sleep 1; done
  fi
  if ! pg_ready && [ "${CI:-}" = "true" ]; then
    echo "CI=true and PostgreSQL on 127.0.0.1:5432 is not available" >&2
    exit 1
  fi
fi

# Debian packages the operator tests use: promtool and prometheus (alert rules, a real
# scrape), chromium and its driver (the status page).  Installed only when missing, with
# apt-get as root; a container's policy-rc.d (exit 101) keeps the prometheus service from
# starting, and where systemd runs it is stopped and disabled at once (the tests start
# their own server on a free loopback port, never the packaged one on 9090).
need_pkgs=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_pkgs+=(chromium-driver)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_pkgs[*]} (apt-get)"
    # policy-rc.d exit 101: maintainer scripts start no service during this install
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      own_policy=1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" \
      || { [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d; exit 1; }
    [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      # nor at boot: the tests start their own server on a free port
      systemctl disable --now prometheus 2>/dev/null || true
    fi
  else
    echo "missing ${need_pkgs[*]}: their tests are skipped (install with apt-get as root)" >&2
  fi
fi

echo "== ruff"; "$BIN/ruff" check .
echo "== mypy"; "$BIN/mypy"
echo "== import contracts"; "$BIN/lint-imports"
echo "== pytest"; "$BIN/pytest" -q -p no:cacheprovider "$@"
