#!/usr/bin/env bash
# Install Debian's Chromium when it is missing: tests/test_compare_study.py opens the HTML
# report of `plugformer compare --report` in it (headless, through playwright). `make test`
# runs this first, so a fresh machine has it; the install took 22 s (apt-get update
# included) on the project's Debian 12 machine.
set -euo pipefail
chromium="${PLUGFORMER_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "plugformer: error: $chromium is missing and this system has no apt-get." >&2
  echo "Expected: Debian's chromium package (tests/test_compare_study.py renders the HTML report in it)." >&2
  echo "Fix: install Chromium and set PLUGFORMER_CHROMIUM to its executable." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo"
fi
echo "plugformer: installing chromium with apt-get (for the HTML report test)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
