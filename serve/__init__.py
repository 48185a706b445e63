"""The Ray Serve signal application (see issue 4)."""
