-- A registry written by the code before build leases (commit 8a9cf6a), dumped with sqlite3's iterdump.
-- Row 2 is a build left 'building' by a process on another host, with no lease column to read.
BEGIN TRANSACTION;
CREATE TABLE artifacts (
	id INTEGER NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	version INTEGER NOT NULL, 
	content_key VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	git_sha VARCHAR(64) NOT NULL, 
	diff_hash VARCHAR(64) NOT NULL, 
	entry_point VARCHAR(256) NOT NULL, 
	config TEXT NOT NULL, 
	locations TEXT NOT NULL, 
	meta TEXT NOT NULL, 
	blessed BOOLEAN, 
	reason TEXT NOT NULL, 
	created_by VARCHAR(128) NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	host VARCHAR(256) NOT NULL, 
	pid INTEGER NOT NULL, 
	pid_started FLOAT NOT NULL, 
	dag_id VARCHAR(256), 
	dag_run_id VARCHAR(256), 
	PRIMARY KEY (id), 
	CONSTRAINT uq_artifact_version UNIQUE (kind, name, version)
);
INSERT INTO "artifacts" VALUES(1,'log','log-0001',1,'k1','succeeded','unknown','','tests:old','{}','["/nowhere/log-0001"]','{}',NULL,'','root','2025-01-01 00:00:00.403759','2025-01-01 00:00:00.418912','old-host',10960,1796014185.57,NULL,NULL);
INSERT INTO "artifacts" VALUES(2,'dataset','fleet',1,'k2','building','unknown','','tests:old','{"n":1}','["/nowhere/fleet/v1"]','{}',NULL,'','root','2025-01-01 00:00:00.423062','2025-01-01 00:00:00.435231','old-host',10960,1796014185.57,NULL,NULL);
CREATE TABLE assignments (
	ledger VARCHAR(256) NOT NULL, 
	"key" VARCHAR(256) NOT NULL, 
	value VARCHAR(64) NOT NULL, 
	assigned_at DATETIME NOT NULL, 
	PRIMARY KEY (ledger, "key")
);
CREATE TABLE edges (
	child_id INTEGER NOT NULL, 
	parent_id INTEGER NOT NULL, 
	PRIMARY KEY (child_id, parent_id), 
	FOREIGN KEY(child_id) REFERENCES artifacts (id), 
	FOREIGN KEY(parent_id) REFERENCES artifacts (id)
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	artifact_id INTEGER NOT NULL, 
	from_state VARCHAR(16), 
	to_state VARCHAR(16) NOT NULL, 
	at DATETIME NOT NULL, 
	"by" VARCHAR(128) NOT NULL, 
	reason TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(artifact_id) REFERENCES artifacts (id)
);
INSERT INTO "events" VALUES(1,1,NULL,'registered','2025-01-01 00:00:00.403759','root','');
INSERT INTO "events" VALUES(2,1,'registered','building','2025-01-01 00:00:00.413852','root','');
INSERT INTO "events" VALUES(3,1,'building','succeeded','2025-01-01 00:00:00.419467','root','');
INSERT INTO "events" VALUES(4,2,NULL,'registered','2025-01-01 00:00:00.423062','root','');
INSERT INTO "events" VALUES(5,2,'registered','building','2025-01-01 00:00:00.435419','root','');
CREATE TABLE promotions (
	id INTEGER NOT NULL, 
	namespace VARCHAR(128) NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	major INTEGER NOT NULL, 
	minor INTEGER NOT NULL, 
	artifact_id INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	promoted_at DATETIME NOT NULL, 
	promoted_by VARCHAR(128) NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_promotion_version UNIQUE (namespace, name, major, minor), 
	FOREIGN KEY(artifact_id) REFERENCES artifacts (id)
);
CREATE INDEX ix_artifacts_content_key ON artifacts (content_key);
CREATE INDEX ix_events_artifact_id ON events (artifact_id);
COMMIT;
