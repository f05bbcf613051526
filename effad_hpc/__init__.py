"""effad-hpc."""
