"""xenpv.xenbus."""
