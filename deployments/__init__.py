"""Ray Serve wrappers. Each deployment owns one model and one concern; graph.py binds them."""
