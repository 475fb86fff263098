"""What every stage shares: the config base, user-facing errors, where outputs live, the Ray connection."""
