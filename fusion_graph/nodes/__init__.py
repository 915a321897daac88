"""The steps of a run: generate (and critique) candidates, then fuse or select."""
