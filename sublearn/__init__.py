"""The ``sublearn`` command: one entry point for the package's experiments."""
