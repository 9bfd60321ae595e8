"""`python -m guidedrl.sandbox --selftest [--isolation auto|bwrap|rlimits]`: the hostile suite, as a table."""

import sys

from guidedrl.sandbox.suite import selftest

if sys.argv[1:2] != ["--selftest"] or sys.argv[2:] not in ([], *(["--isolation", m] for m in ("auto", "bwrap", "rlimits"))):
    sys.exit("usage: python -m guidedrl.sandbox --selftest [--isolation auto|bwrap|rlimits]")
sys.exit(selftest(sys.argv[3] if len(sys.argv) > 3 else "auto"))
