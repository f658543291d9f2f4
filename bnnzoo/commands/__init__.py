"""Extra ``bnnzoo`` subcommands: each module here that defines a ``click`` command named ``command``
has it added to the command group by :mod:`bnnzoo.cli`; :mod:`.common` holds what the commands share."""
