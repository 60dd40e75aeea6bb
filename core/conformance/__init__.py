"""The laminae conformance suite: a pytest plugin and the tests every driver must pass.

Run it against an installed driver from any directory, as root (the suite mounts layers)::

    pytest --pyargs laminae.conformance --laminae-driver NAME \\
        [--laminae-strict] [--laminae-report FILE] [--laminae-timeout SECONDS]

It is safe to run on any machine, beside other programs that mount:

- **Its own mount namespace.** As root, the plugin moves the session into a mount namespace
  of its own, with every mount in it private, before the first test, whatever the caller's
  namespace and its propagation look like (the header's ``laminae mount namespace`` line
  says what it did). Nothing a test mounts reaches the host, and the host's later mounts
  do not show in the session; the processes a test starts share the session's namespace.
  Without ``CAP_SYS_ADMIN`` (root in a container that did not grant it) no namespace can
  be made and nothing can be mounted: every test reports the driver unavailable, saying
  why. A rootless run is root in a user namespace of its own
  (``unshare --user --map-root-user``), where this works as well.
- **Only its own leaks.** After every test, the leak guard counts mounts whose mount point
  is in the test's own directories (its ``tmp_path``, which holds the driver's home, the
  store's root and run directory, the scratch and sentinel directories, and the roots of
  the other stores it opened) and loop devices whose backing file is there. Those fail the
  test and are unmounted (lazily only when busy) and detached, by path. Any other mount or
  loop device, of another program or of a process the test started, is never counted and
  never touched.
- **Device nodes no driver owns.** The layers the suite builds hold device nodes with the
  major 240 (set aside for local and experimental use) or 4095 (beyond what any driver can
  register), so a driver that opens one by mistake fails at once instead of reading a
  terminal or a disk; the tar builder refuses a major ``/proc/devices`` lists.
- **A time limit.** Each of a test's setup, call and teardown may take ``--laminae-timeout``
  seconds (300 by default, 0 for no limit). A test that takes longer fails with a message
  naming the store call it was making, the driver call under it and where that was stuck::

      laminae: the test's call timed out after 300s (--laminae-timeout): in
      Store.create_layer (_layers.py:320), in the driver's MyDriver.create (_driver.py:88),
      stuck in copy_tree (_copy.py:41)

  The limit is ``SIGALRM``, caught in the test's thread: a system call the kernel can
  interrupt (a read of a FIFO or a device, a wait) ends there; one in uninterruptible sleep
  (``D`` in ``ps``) cannot be ended by any signal.

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
``crash``, ``hostile``, ``holes`` (sparse files through apply, copies and commits),
``metadata`` (xattrs of special files, directory mtimes), ``faults`` (write errors during an
apply, frozen committed storage, mount flags) and ``crosscheck`` (the same properties read
again through the change walker and ``usage``). One more area is a tier of its own:
``contract`` calls the driver directly, with no store in between, as containerd's
snapshotter testsuite does, so a failure there is the driver's and not the core's.

``--laminae-no-known-failures`` runs the declared known failures as ordinary tests; without
it they are counted as ``known failures`` in pytest's final line and listed, with their
reasons, in the summary. A known failure needs a reason.
"""
