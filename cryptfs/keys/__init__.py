"""Key material: the key file and its feature flags, the key hierarchy
(master key to subkeys), passwords, recovery codes."""
