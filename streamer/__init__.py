"""Stream Postgres row changes to browsers as Server-Sent Events."""
