"""A procedurally generated toy world for running Perfusion end to end on a CPU."""
