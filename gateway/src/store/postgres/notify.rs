//! Revocations committed by other replicas reach this one's revocation head (and so its feed's
//! long polls and its CRL) within moments: each revoking commit sends a `NOTIFY` with the new
//! feed position, and every replica `LISTEN`s on a connection of its own. Notifications sent
//! while that connection is down are lost, so after every (re)connection, and every
//! [`RESYNC`] as a fallback, the head is read from the database.

use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use super::super::StoreError;
use super::connect::Db;

/// The notification channel revoking commits signal on.
pub(super) const CHANNEL: &str = "omnirelay_revocations";

/// How often the head is read from the database even without a notification.
const RESYNC: Duration = Duration::from_secs(5);

/// Longest pause between two attempts to listen again.
const MAX_RECONNECT: Duration = Duration::from_secs(5);

/// Follows other replicas' revocations until the store is gone.
pub(super) async fn follow(db: Weak<Db>) {
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(strong) = db.upgrade() else { return };
        let listening = listen(&strong).await;
        drop(strong);
        match listening {
            Ok((client, seqs)) => {
                pause = Duration::from_millis(50);
                if !listen_until_lost(&db, seqs).await {
                    return;
                }
                drop(client);
                tracing::warn!("store: the revocation listener lost its connection");
            }
            Err(e) => tracing::warn!(error = %e, "store: cannot listen for revocations"),
        }
        // Reconnection backoff, doubling to MAX_RECONNECT (the 5 s resync covers the gap).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RECONNECT);
    }
}

/// Applies notifications and periodic resyncs until the connection is lost (true) or the
/// store is gone (false).
async fn listen_until_lost(db: &Weak<Db>, mut seqs: mpsc::UnboundedReceiver<u64>) -> bool {
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            seq = seqs.recv() => {
                let Some(seq) = seq else { return true };
                let Some(db) = db.upgrade() else { return false };
                db.advance_revocation_head(seq);
            }
            // The first tick is at once: what was revoked while nobody listened.
            _ = resync.tick() => {
                let Some(db) = db.upgrade() else { return false };
                match db.revocation_head().await {
                    Ok(seq) => db.advance_revocation_head(seq),
                    Err(e) => tracing::warn!(error = %e, "store: cannot read the revocation head"),
                }
            }
        }
    }
}

/// A connection of its own, listening on [`CHANNEL`]; notifications arrive on the receiver,
/// which closes when the connection is lost.
async fn listen(db: &Db) -> Result<(Client, mpsc::UnboundedReceiver<u64>), StoreError> {
    let (out, seqs) = mpsc::unbounded_channel();
    let client = match &db.listen_tls {
        Some(tls) => {
            let (client, connection) = db.listen_config.connect(tls.clone()).await?;
            tokio::spawn(forward(connection, out));
            client
        }
        None => {
            let (client, connection) = db.listen_config.connect(NoTls).await?;
            tokio::spawn(forward(connection, out));
            client
        }
    };
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok((client, seqs))
}

/// Drives the listening connection, passing on each notification's feed position.
async fn forward<S, T>(mut connection: Connection<S, T>, out: mpsc::UnboundedSender<u64>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
        match message {
            Ok(AsyncMessage::Notification(n)) => {
                if let Ok(seq) = n.payload().parse() {
                    let _ = out.send(seq);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
