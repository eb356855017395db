"""Step kinds of the science: each module holds a Params model and one function, registered as an
entry point of the group `pipelines.steps` in pyproject.toml."""
