"""xenpv.platforms.xen."""
