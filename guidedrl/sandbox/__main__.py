"""`python -m guidedrl.sandbox --selftest [--isolation auto|bwrap|rlimits]`: the hostile suite, as a table;
`python -m guidedrl.sandbox --overhead`: what a test case costs."""

import sys

from guidedrl.sandbox.suite import overhead, selftest

if sys.argv[1:] == ["--overhead"]:
    overhead()
    sys.exit(0)
if sys.argv[1:2] != ["--selftest"] or sys.argv[2:] not in ([], *(["--isolation", m] for m in ("auto", "bwrap", "rlimits"))):
    sys.exit("usage: python -m guidedrl.sandbox --selftest [--isolation auto|bwrap|rlimits] | --overhead")
sys.exit(selftest(sys.argv[3] if len(sys.argv) > 3 else "auto"))
