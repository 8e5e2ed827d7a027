"""Sub-commands of the `vitscope` CLI: each module defines configure(parser) and run(args)."""
