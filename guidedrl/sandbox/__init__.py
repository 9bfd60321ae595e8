"""The code sandbox: model-written Python run against its tests in a bubblewrap jail, the verdict
decided outside the program's process (docs/security.md)."""
