"""t2t: being written."""
