"""xenpv.backends."""
