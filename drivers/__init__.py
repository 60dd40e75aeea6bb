"""The drivers that ship with laminae; each registers through the ``laminae.drivers`` group."""
