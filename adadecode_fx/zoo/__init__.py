"""Real models and prompt sets that ship inside PyPI wheels, usable offline: `models`, `data`."""
