"""The SAM paper's evaluation protocol, its aggregation over a split, and its reports."""
