"""xenpv.frontends."""
