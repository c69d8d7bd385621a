"""Bubuh's services and their shared kernel."""

import warnings

# pyHanko imports cryptography's DSA key type to tell key kinds apart (pyhanko/sign/signers/pdf_cms.py), and
# cryptography >= 51 warns at that import that DSA is deprecated: every `bubuh` command printed four lines of it
# before its own. Bubuh neither makes nor needs DSA keys; the warning is silenced for that import alone.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"pyhanko\.")

# The sandboxes' fork server loads the program's module (services.operator.cli) once, so that each child it forks
# need not (stamping/sandbox.py, _main_module); multiprocessing then runs that module again in each child as
# __mp_main__, and runpy warns that it is already loaded: a line in the log of every API and stamping process for
# every child started. Loaded on purpose; the warning is silenced for that module alone.
warnings.filterwarnings("ignore", message=r"'services\.operator\.cli' found in sys\.modules", category=RuntimeWarning)
