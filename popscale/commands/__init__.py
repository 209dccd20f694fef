"""The subcommands of `popscale`, by group: data, train, models, cluster (cli.py puts them together)."""
