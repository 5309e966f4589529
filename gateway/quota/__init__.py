"""The quota engine: pure rules (periods, GCRA, decisions) and the counter stores."""
