"""Factory provisioning (docs/FACTORY.md): the station's records (`mpboot.factory.db`: boards,
serials and the append-only audit log, in SQLite or PostgreSQL)."""
