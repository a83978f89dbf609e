#!/usr/bin/env bash
# The one system package the test suite needs: Debian's chromium (the HTML report is opened in
# a real headless browser). Installed with apt-get when missing and when we are root; otherwise
# one line says how, and the browser test reports it.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || [ -n "${GEOPIXELD_CHROMIUM:-}" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then
    exit 0
  fi
fi
echo "note: chromium is not installed and could not be installed here; run 'sudo apt-get install chromium' (or set GEOPIXELD_CHROMIUM to a Chromium binary) for the browser test" >&2
exit 0
