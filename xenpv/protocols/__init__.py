"""xenpv.protocols."""
