"""The ``loraga-fast`` command (never imported by the library).

* :mod:`~loraga_fast.command.main` -- the parser and :func:`~loraga_fast.command.main.main`;
* :mod:`~loraga_fast.command.init` -- ``loraga-fast init``;
* :mod:`~loraga_fast.command.inputs` -- what ``init`` reads: models and text;
* :mod:`~loraga_fast.command.bench` -- ``loraga-fast bench``.
"""
