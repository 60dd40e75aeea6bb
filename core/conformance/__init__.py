"""The laminae conformance suite: a pytest plugin and the tests every driver must pass.

Run it against an installed driver from any directory::

    pytest --pyargs laminae.conformance --laminae-driver NAME \\
        [--laminae-strict] [--laminae-report FILE]

The plugin (:mod:`laminae.conformance.plugin`) is loaded by every pytest run through the
``pytest11`` entry point and stays inert until a driver is selected.
"""
