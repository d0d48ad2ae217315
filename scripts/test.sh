#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them.
#   - system packages, only when missing: nginx (a real backend), mariadb-server (a real
#     server-speaks-first TCP peer, and the primary and replicas), haproxy and wrk (the
#     benchmark runner, which the suite runs once with --quick), openssl (its throwaway
#     certificate for the HTTPS scenario), chromium (headless: renders the stats page; with a
#     font, as recommends are not installed), keepalived, nftables, iproute2 and curl (the lab:
#     hosts in network namespaces, two load balancers on a VRRP address; tests/test_lab.py)
#   - the project itself with its test extras, into the current Python
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
have nginx || missing+=(nginx)
have mariadbd || missing+=(mariadb-server)
have haproxy || missing+=(haproxy)
have wrk || missing+=(wrk)
have openssl || missing+=(openssl)
have chromium || missing+=(chromium fonts-dejavu-core)
have keepalived || missing+=(keepalived)
have nft || missing+=(nftables)
have ip || missing+=(iproute2)
[ -x /usr/bin/curl ] || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing system packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "== installing foobar with its test dependencies"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

echo "== running the tests"
# two test processes (pytest-xdist), each taking whole files (so a module's fixtures, such as
# the lab, are made once): most tests wait on real processes, sockets and timeouts, not on the
# CPU. FOOBAR_TEST_PROCESSES=0 runs them in this one process.
exec "$PYTHON" -m pytest -n "${FOOBAR_TEST_PROCESSES:-2}" --dist loadfile "$@"
