#!/usr/bin/env bash
# Debian packages the platform and its tests need, installed when missing (root, or sudo).
#   postgresql     the local database (deploy/local/postgres.sh)
#   poppler-utils  pdfsig / pdftotext / pdftoppm: an independent check of our signatures
#   libnss3-tools  certutil: the NSS database that makes pdfsig trust the dev CA
#   softhsm2       a real PKCS#11 token for the HSM signing path
#   opensc         pkcs11-tool, to put the dev key on that token
#   zbar-tools     zbarimg: decodes the QR code from a rendered page in tests
#   chromium       the headless browser that opens the page behind the QR (tests/e2e/test_verify_page.py),
#                  and the print-to-PDF producer of the test corpus (tests/pdf_producers.py)
#   qpdf           the corpus's transforms (object streams, linearized, decrypted) and a check that a file opens
#   ghostscript    ps2pdf: one more PDF producer in the test corpus (tests/pdf_producers.py)
set -euo pipefail
want=(postgresql poppler-utils libnss3-tools softhsm2 opensc zbar-tools chromium qpdf ghostscript)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
