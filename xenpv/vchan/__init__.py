"""xenpv.vchan."""
