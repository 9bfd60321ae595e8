"""`python -m guidedrl` runs the command line."""

from guidedrl.cli import main

raise SystemExit(main())
