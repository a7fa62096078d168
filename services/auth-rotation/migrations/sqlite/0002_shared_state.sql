-- Leases and the event log (see the PostgreSQL migration of the same name;
-- on SQLite there is one writer, so one replica).
CREATE TABLE leases (
    id             TEXT PRIMARY KEY,
    provider       TEXT NOT NULL,
    model          TEXT NOT NULL,
    credential_id  TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL
);

CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    origin          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    provider        TEXT NOT NULL,
    model           TEXT NOT NULL,
    credential_id   TEXT NOT NULL,
    outcome         INTEGER NOT NULL,
    retry_after_ms  INTEGER NOT NULL,
    at_ms           INTEGER NOT NULL
);
