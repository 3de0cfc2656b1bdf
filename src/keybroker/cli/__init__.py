"""The ``keybroker`` command line."""
