-- Every write, in commit order (SQLite has one writer), so that each
-- in-process index follows the store (services/retrieval/src/follow.rs).
-- kind: 'chunks' (removed/added: JSON arrays of chunk keys),
-- 'collection_created' or 'collection_deleted'.
CREATE TABLE changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    kind       TEXT NOT NULL,
    removed    TEXT NOT NULL,
    added      TEXT NOT NULL,
    at_ms      INTEGER NOT NULL
);
