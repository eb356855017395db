"""Random training subsets (for datamodel experiments and LDS) and groups of training examples."""
