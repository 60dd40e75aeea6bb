"""The laminae conformance suite: a pytest plugin and the tests every driver must pass.

Run it against an installed driver from any directory, as root (the suite mounts layers;
the plugin moves itself into a private mount namespace if it is not in one)::

    pytest --pyargs laminae.conformance --laminae-driver NAME \\
        [--laminae-strict] [--laminae-report FILE]

The plugin (:mod:`laminae.conformance.plugin`) is loaded by every pytest run through the
``pytest11`` entry point and stays inert until a driver is selected.

What a driver author controls, all through the driver's :class:`laminae.Capabilities`:

- ``features``: tests marked ``laminae_requires(Feature.X)`` are skipped, with the reason,
  for a driver that does not declare ``X``.
- ``max_depth``: the depth tests build chains to ``min(max_depth, 500)`` and check that one
  layer more is refused.
- ``known_failures``: ``{test id: reason}``; those tests run as strict xfails, so a fix
  shows up as an unexpected pass. A test id is ``<area>::<test name>[<parameters>]``, as the
  report lists them (``apply::test_fifos``, ``diff::test_echo[3]``); an id without the
  parameters covers all of them. Ids are API: they are never renamed.

A driver that needs a special filesystem (btrfs on a loop image) implements the
``laminae_conformance_home(driver_name, base)`` hook and yields a home on it. A driver
package can also run the suite's classes in its own tests by subclassing them
(``class TestMine(laminae.conformance.test_layers.TestLayers): ...``) with
``--laminae-driver`` given.

Areas, one module each: ``layers`` (lifecycle and bad input), ``mounts`` (read-only,
counting, content written through mounts), ``apply`` (content fidelity through real tars),
``diff`` (changes and diffs), ``depth``, ``labels`` (stat, walk, update), ``concurrency``,
``crash`` and ``hostile``.
"""
