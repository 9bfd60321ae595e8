"""`python -m guidedrl.sandbox --selftest [--isolation basic|namespaces]`: the hostile suite, as a table."""

import sys

from guidedrl.sandbox.suite import selftest

if sys.argv[1:2] != ["--selftest"] or sys.argv[2:] not in ([], ["--isolation", "basic"], ["--isolation", "namespaces"]):
    sys.exit("usage: python -m guidedrl.sandbox --selftest [--isolation basic|namespaces]")
sys.exit(selftest(sys.argv[3] if len(sys.argv) > 3 else "auto"))
