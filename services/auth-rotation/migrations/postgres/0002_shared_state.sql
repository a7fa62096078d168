-- State every replica must agree on (services/auth-rotation/src/registry/follow.rs):
-- leases, so that any replica can take a report of a lease another granted;
-- and the log of outcomes and configuration changes, which every replica
-- applies to its breakers, cool-downs and credentials. Writers take an
-- advisory lock before adding an event, so events commit in seq order.
CREATE TABLE leases (
    id             TEXT PRIMARY KEY,
    provider       TEXT NOT NULL,
    model          TEXT NOT NULL,
    credential_id  TEXT NOT NULL,
    expires_at_ms  BIGINT NOT NULL
);

CREATE TABLE events (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    provider        TEXT NOT NULL,
    model           TEXT NOT NULL,
    credential_id   TEXT NOT NULL,
    outcome         BIGINT NOT NULL,
    retry_after_ms  BIGINT NOT NULL,
    at_ms           BIGINT NOT NULL
);
