"""Small helpers shared across up2's packages."""
