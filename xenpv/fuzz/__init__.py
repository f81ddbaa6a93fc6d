"""xenpv.fuzz."""
