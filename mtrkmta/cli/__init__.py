"""Command-line entry points: ``mtrkmta`` subcommands and the options shared with twistd."""
