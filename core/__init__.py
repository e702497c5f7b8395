"""Beam-free plumbing shared by the job (pipeline/, transforms/) and the index (search/)."""
