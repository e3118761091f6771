-- The warehouse side of the compose stack: a role and the three example databases.
CREATE ROLE warehouse LOGIN PASSWORD 'warehouse';
CREATE DATABASE hospital OWNER warehouse;
CREATE DATABASE research OWNER warehouse;
CREATE DATABASE vendor OWNER warehouse;
