"""xenpv.platforms."""
