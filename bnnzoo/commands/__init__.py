"""Extra ``bnnzoo`` subcommands: each module here defines one ``click`` command named ``command``,
which :mod:`bnnzoo.cli` adds to the command group."""
