"""Every setting of a run (one declaration each), the command line built from them, and what a run records of itself."""
