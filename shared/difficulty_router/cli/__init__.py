"""The `difficulty-router` command line: one module per group of commands, sharing the helpers in `common`."""
