-- Every write, in commit order (writers take an advisory lock before adding
-- their row, so a smaller seq never commits after a larger one), so that
-- each replica applies the others' writes to its in-process index
-- (services/retrieval/src/follow.rs). kind: 'chunks' (removed/added: JSON
-- arrays of chunk keys), 'collection_created' or 'collection_deleted'.
CREATE TABLE changes (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection TEXT NOT NULL,
    kind       TEXT NOT NULL,
    removed    TEXT NOT NULL,
    added      TEXT NOT NULL,
    at_ms      BIGINT NOT NULL
);
