//! `release_requests`.

use super::{Row, SqlTx, typed};
use crate::model::{ReleaseRequest, RequestState};
use crate::store::{ApprovalStore, Result};

const COLUMNS: &str =
    "id, host, guest_uuid, guest_name, volumes, state, created, decided, decided_by, note";

fn row(r: &Row) -> Result<ReleaseRequest> {
    let volumes: String = r.get(4)?;
    Ok(ReleaseRequest {
        id: r.get(0)?,
        host: r.get(1)?,
        guest_uuid: r.get(2)?,
        guest_name: r.get(3)?,
        volumes: volumes
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect(),
        state: typed(r, 5, "release_requests.state")?,
        created_unix: r.get(6)?,
        decided_unix: r.get(7)?,
        decided_by: r.get(8)?,
        note: r.get(9)?,
    })
}

impl ApprovalStore for SqlTx<'_> {
    fn insert_request(&mut self, q: &ReleaseRequest) -> Result<()> {
        self.db
            .execute(&format!(
                "INSERT INTO release_requests ({COLUMNS}, n) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                     (SELECT COALESCE(MAX(n), 0) + 1 FROM release_requests))"
            ), params![
                q.id,
                q.host,
                q.guest_uuid,
                q.guest_name,
                q.volumes.join(","),
                q.state.as_str(),
                q.created_unix,
                q.decided_unix,
                q.decided_by,
                q.note
            ])?;
        Ok(())
    }

    fn open_request(&mut self, host: &str, guest_uuid: &str) -> Result<Option<ReleaseRequest>> {
        self.db.query_opt(
            &format!(
                "SELECT {COLUMNS} FROM release_requests
                 WHERE host = $1 AND guest_uuid = $2 AND state IN ('pending', 'approved')
                 ORDER BY created DESC, n DESC LIMIT 1"
            ),
            params![host, guest_uuid],
            row,
        )
    }

    fn request(&mut self, id: &str) -> Result<Option<ReleaseRequest>> {
        self.db.query_opt(
            &format!("SELECT {COLUMNS} FROM release_requests WHERE id = $1"),
            [id],
            row,
        )
    }

    fn requests(&mut self, state: Option<RequestState>) -> Result<Vec<ReleaseRequest>> {
        let stmt = &format!(
            "SELECT {COLUMNS} FROM release_requests WHERE CAST($1 AS TEXT) IS NULL OR state = $1
             ORDER BY created DESC, n DESC LIMIT 1000"
        );
        let rows = self
            .db
            .query_all(stmt, [state.map(RequestState::as_str)], row)?;
        Ok(rows)
    }

    fn move_request(
        &mut self,
        id: &str,
        from: RequestState,
        to: RequestState,
        now: i64,
        by: &str,
        note: &str,
    ) -> Result<bool> {
        let n = self
            .db
            .execute(
                "UPDATE release_requests SET state = $3, decided = CASE WHEN $5 = '' THEN decided ELSE $4 END,
                     decided_by = CASE WHEN $5 = '' THEN decided_by ELSE $5 END,
                     note = CASE WHEN $6 = '' THEN note ELSE $6 END
                 WHERE id = $1 AND state = $2",
            params![id, from.as_str(), to.as_str(), now, by, note])?;
        Ok(n == 1)
    }

    fn expire_requests(&mut self, before: i64) -> Result<Vec<String>> {
        let ids: Vec<String> = {
            let stmt = "SELECT id FROM release_requests
                 WHERE state IN ('pending', 'approved') AND created < $1";

            self.db.query_all(stmt, [before], |r| r.get(0))?
        };
        self.db.execute(
            "UPDATE release_requests SET state = 'expired'
                 WHERE state IN ('pending', 'approved') AND created < $1",
            [before],
        )?;
        Ok(ids)
    }
}
