"""Data sources for attribution studies, read into the project's table layouts."""
