"""The `relay` command line: one module per command group, the shared options in `common`."""
