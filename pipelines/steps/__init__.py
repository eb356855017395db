"""Generic step kinds that make the engine useful on its own: `read` and `sql`."""
