-- Least-privilege grants for the role a pipeline (Airflow worker) connects as.
-- Run as the owner of the audit and escrow tables, after they exist (a first run as the owner, or
-- `pseudonymise audit verify --db ...`, creates them). The pipeline role can append to the audit
-- but never rewrite it, and can write escrow but never read its ciphertexts (it could not open
-- them anyway: only a reverse token holds the escrow private key).
CREATE ROLE pseudonymise_pipeline LOGIN;

-- The write modes' interval lock (replace, replace_partition): one row per open writer, removed
-- before it commits. A role that may create tables makes it on first use, this makes it otherwise.
CREATE TABLE IF NOT EXISTS pseudonymise_write_lock (holder text PRIMARY KEY, target text NOT NULL,
    span box NOT NULL, EXCLUDE USING gist (span WITH &&));
GRANT SELECT, INSERT, DELETE ON pseudonymise_write_lock TO pseudonymise_pipeline;

GRANT SELECT, INSERT ON pseudonymise_audit TO pseudonymise_pipeline;
GRANT SELECT, UPDATE ON pseudonymise_audit_head TO pseudonymise_pipeline;   -- the chain's head pointer
GRANT INSERT ON pseudonymise_escrow_batch TO pseudonymise_pipeline;
GRANT INSERT ON pseudonymise_escrow TO pseudonymise_pipeline;
GRANT SELECT (project, pseudonym) ON pseudonymise_escrow TO pseudonymise_pipeline;  -- ON CONFLICT … RETURNING
-- and on the data: SELECT on the sources, INSERT/DELETE on the targets.

-- The auditor / reverse role reads escrow and audit, and writes only the audit:
CREATE ROLE pseudonymise_auditor LOGIN;
GRANT SELECT, INSERT ON pseudonymise_audit TO pseudonymise_auditor;
GRANT SELECT, UPDATE ON pseudonymise_audit_head TO pseudonymise_auditor;
GRANT SELECT ON pseudonymise_escrow, pseudonymise_escrow_batch TO pseudonymise_auditor;
-- The purge job additionally needs DELETE on the two escrow tables.
