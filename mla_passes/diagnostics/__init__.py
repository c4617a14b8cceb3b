"""The diagnostics behind the ``mla-passes`` commands, one module per command:
``demo``, ``dump``, ``diff``, ``report``, ``patterns``, ``lint`` (each with ``HELP``,
``add_arguments`` and ``run``; the command line is :mod:`mla_passes.cli`), and what
they share: ``graph_files`` (reading dumped graphs) and ``argtypes`` (argument types
and usage errors). Nothing in the core imports this package."""
