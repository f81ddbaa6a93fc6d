"""xenpv.xenstore."""
