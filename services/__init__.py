"""Bubuh's services and their shared kernel."""

import warnings

# pyHanko imports cryptography's DSA key type to tell key kinds apart (pyhanko/sign/signers/pdf_cms.py), and
# cryptography >= 51 warns at that import that DSA is deprecated: every `bubuh` command printed four lines of it
# before its own. Bubuh neither makes nor needs DSA keys; the warning is silenced for that import alone.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"pyhanko\.")
