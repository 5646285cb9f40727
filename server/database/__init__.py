"""The database: where it is, its schema and migrations, and the data-access layer over it."""
