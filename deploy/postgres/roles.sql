-- PostgreSQL roles for keybroker: a migrator that owns the schema (DDL) and a runtime role that
-- only reads and writes rows (no DDL). Run once per database, as a superuser or the database
-- owner, connected to the keybroker database:
--
--   psql "postgresql://admin@db.internal/keybroker" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--
-- then give both roles passwords (`\password keybroker_migrator`, `\password keybroker_runtime`,
-- or your secret manager) and require TLS for them in pg_hba.conf (hostssl ... scram-sha-256).
-- Safe to run again: existing roles and the schema are kept, grants are re-applied.
--
-- How keybroker uses them:
--   keybroker migrate --config keybroker.toml      as keybroker_migrator: applies the numbered
--                                                  migrations (CREATE TABLE, ALTER TABLE, indexes)
--   keybroker serve, [state] migrate = false       as keybroker_runtime: SELECT, INSERT, UPDATE,
--                                                  DELETE, LISTEN/NOTIFY and advisory locks; the
--                                                  broker refuses to start while the schema is
--                                                  behind it ("run keybroker migrate")
-- Both roles find the tables through their search_path (schema keybroker), so [state] url
-- needs no schema option.

DO $roles$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keybroker_migrator') THEN
    CREATE ROLE keybroker_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keybroker_runtime') THEN
    CREATE ROLE keybroker_runtime LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
  END IF;
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO keybroker_migrator, keybroker_runtime',
                 current_database());
  EXECUTE format('ALTER ROLE keybroker_migrator IN DATABASE %I SET search_path = keybroker',
                 current_database());
  EXECUTE format('ALTER ROLE keybroker_runtime IN DATABASE %I SET search_path = keybroker',
                 current_database());
END
$roles$;

-- Nobody but the migrator creates objects (PostgreSQL < 15 lets every role create in public).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS keybroker AUTHORIZATION keybroker_migrator;
REVOKE ALL ON SCHEMA keybroker FROM PUBLIC;
GRANT USAGE ON SCHEMA keybroker TO keybroker_runtime;

-- Tables and sequences the migrator creates from now on ...
ALTER DEFAULT PRIVILEGES FOR ROLE keybroker_migrator IN SCHEMA keybroker
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO keybroker_runtime;
ALTER DEFAULT PRIVILEGES FOR ROLE keybroker_migrator IN SCHEMA keybroker
  GRANT USAGE, SELECT ON SEQUENCES TO keybroker_runtime;
-- ... and those it created before this script ran.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA keybroker TO keybroker_runtime;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA keybroker TO keybroker_runtime;
