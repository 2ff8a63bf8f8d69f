#!/usr/bin/env bash
# The tests' real peers come from Debian: dcmtk (storescu/storescp/echoscu) and orthanc, and
# openssl (the DICOM TLS tests make their throw-away CA and certificates with it), and poppler-utils
# (the QA report tests turn the PDF pages into PNG with pdftoppm), and chromium (the review page's
# browser tests drive it with Playwright; Playwright's own browser download cannot work offline), and
# postgresql (the review page's test on a PostgreSQL audit database, a throw-away cluster).
# Installs them when missing and running as root; otherwise stops with the exact line to run.
set -euo pipefail
missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v pdftoppm >/dev/null 2>&1 || missing+=(poppler-utils)
[ -x /usr/bin/chromium ] || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || missing+=(orthanc)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "installing ${missing[*]} (Debian packages the integration tests need)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The orthanc package may start a system service on 4242/8042; the tests start their own.
  if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
else
  echo "The tests need the Debian packages: ${missing[*]}. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
