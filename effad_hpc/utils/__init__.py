"""Small helpers shared by every layer: atomic file writes, device selection, memory reuse in loops."""
