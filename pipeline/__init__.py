"""The tagging job: options, graph assembly, entry point (`python -m pipeline`)."""
