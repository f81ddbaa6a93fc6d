"""xenpv.platforms.loopback."""
