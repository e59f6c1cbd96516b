//! The policy pin the replicas share: one row, whose `generation` grows with every pin and
//! unpin through any replica. Each change sends `NOTIFY` on [`CHANNEL`] when (and only if) it
//! commits; every replica's listener then reads the row and moves its pin watch, which the
//! reloader follows through its own pipeline.

use super::super::{BoxFuture, SharedPin, StoreError};
use super::connect::{Applied, Change, Db, Tx};
use super::{int, uint};

/// The notification channel pin changes signal on.
pub(super) const CHANNEL: &str = "omnirelay_policy_pin";

/// Records a pin (or an unpin, `target` None) for the fleet.
pub(super) struct Share {
    pub target: Option<String>,
    pub commit: Option<String>,
    pub by: String,
    pub now: u64,
}

impl Change for Share {
    type Output = SharedPin;

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
    ) -> BoxFuture<'a, Result<Applied<SharedPin>, StoreError>> {
        Box::pin(async move {
            let row = tx
                .query_one(
                    "UPDATE policy_pin SET generation = generation + 1, target = $1,
                         commit_id = $2, set_by = $3, set_at = $4
                     WHERE id = 1 RETURNING generation",
                    &[&self.target, &self.commit, &self.by, &int(self.now)],
                )
                .await?;
            let generation = uint(&row, 0)?;
            tx.query(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &generation.to_string()],
            )
            .await?;
            Ok(Applied::Commit(SharedPin {
                generation,
                target: self.target.clone(),
                commit: self.commit.clone(),
                by: self.by.clone(),
            }))
        })
    }
}

/// The fleet's pin as the database holds it now.
pub(super) async fn read(db: &Db) -> Result<SharedPin, StoreError> {
    let rows = db
        .read(
            "SELECT generation, target, commit_id, set_by FROM policy_pin WHERE id = 1",
            &[],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(SharedPin::default());
    };
    Ok(SharedPin {
        generation: uint(row, 0)?,
        target: row.try_get(1)?,
        commit: row.try_get(2)?,
        by: row.try_get(3)?,
    })
}
