"""`python -m guidedrl` runs the command line."""

from guidedrl.app.cli import main

raise SystemExit(main())
