-- The context service's durable archive. Every appended turn is written here
-- before the append is acknowledged, so a session evicted or lost from Redis
-- can be restored. Tables live in the service's own schema
-- (MOLTBOT_CONTEXT_ARCHIVE_SCHEMA, default moltbot_context), as does sqlx's
-- migration ledger, so other services' migrations never collide with ours.

CREATE TABLE sessions (
    tenant          TEXT    NOT NULL,
    session_id      TEXT    NOT NULL,
    -- ms since the Unix epoch
    created_at_ms   BIGINT  NOT NULL,
    last_active_ms  BIGINT  NOT NULL,
    -- sliding TTL in seconds; the session is dead once now >= expires_at_ms
    ttl_s           INTEGER NOT NULL,
    expires_at_ms   BIGINT  NOT NULL,
    -- turns archived since the last reset (the archive itself is not trimmed)
    turn_count      BIGINT  NOT NULL DEFAULT 0,
    -- next turn sequence number; never reused within a session row
    next_seq        BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, session_id)
);

CREATE TABLE turns (
    tenant          TEXT     NOT NULL,
    session_id      TEXT     NOT NULL,
    seq             BIGINT   NOT NULL,
    -- moltbot.context.v1.Role as its number
    role            SMALLINT NOT NULL,
    content         TEXT     NOT NULL,
    token_count     INTEGER  NOT NULL,
    created_at_ms   BIGINT   NOT NULL,
    PRIMARY KEY (tenant, session_id, seq),
    FOREIGN KEY (tenant, session_id) REFERENCES sessions ON DELETE CASCADE
);

-- Idempotency keys of acknowledged appends: a retry after a Redis flush is
-- still recognised.
CREATE TABLE appends (
    tenant          TEXT   NOT NULL,
    session_id      TEXT   NOT NULL,
    idempotency_key TEXT   NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (tenant, session_id, idempotency_key),
    FOREIGN KEY (tenant, session_id) REFERENCES sessions ON DELETE CASCADE
);
