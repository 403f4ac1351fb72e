"""One module per ``kissray`` subcommand (see :mod:`kissray.cli`)."""
