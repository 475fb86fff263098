"""polyrec's Ray Serve recommendation graph and its durable feedback log."""
