"""Everything that uses the core to make results; nothing outside analysis/ imports it."""
