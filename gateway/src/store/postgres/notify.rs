//! Revocations and policy pins committed by other replicas reach this one within moments: each
//! revoking commit sends a `NOTIFY` with the new feed position (moving the revocation head, so
//! the feed's long polls and the CRL), each pin or unpin one with its generation (moving the
//! pin watch the reloader follows), and every replica `LISTEN`s on a connection of its own.
//! Notifications sent while that connection is down are lost, so after every (re)connection,
//! and every [`RESYNC`] as a fallback, both are read from the database.

use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use super::super::StoreError;
use super::connect::Db;

/// The notification channel revoking commits signal on.
pub(super) const CHANNEL: &str = "omnirelay_revocations";

/// What a notification says.
enum Note {
    /// A revocation committed: the feed's new position.
    Revoked(u64),
    /// The fleet's policy pin changed: read it.
    Pin,
}

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
            Ok((client, notes)) => {
                pause = Duration::from_millis(50);
                if !listen_until_lost(&db, notes).await {
                    return;
                }
                drop(client);
                tracing::warn!("store: the notification listener lost its connection");
            }
            Err(e) => tracing::warn!(error = %e, "store: cannot listen for revocations and pins"),
        }
        // Reconnection backoff, doubling to MAX_RECONNECT (the 5 s resync covers the gap).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RECONNECT);
    }
}

/// Applies notifications and periodic resyncs until the connection is lost (true) or the
/// store is gone (false).
async fn listen_until_lost(db: &Weak<Db>, mut notes: mpsc::UnboundedReceiver<Note>) -> bool {
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = notes.recv() => {
                let Some(note) = note else { return true };
                let Some(db) = db.upgrade() else { return false };
                match note {
                    Note::Revoked(seq) => db.advance_revocation_head(seq),
                    Note::Pin => resync_pin(&db).await,
                }
            }
            // The first tick is at once: what was revoked while nobody listened.
            _ = resync.tick() => {
                let Some(db) = db.upgrade() else { return false };
                match db.revocation_head().await {
                    Ok(seq) => db.advance_revocation_head(seq),
                    Err(e) => tracing::warn!(error = %e, "store: cannot read the revocation head"),
                }
                resync_pin(&db).await;
            }
        }
    }
}

/// Reads the fleet's pin and moves the watch to it if it is newer.
async fn resync_pin(db: &Db) {
    match super::pin::read(db).await {
        Ok(pin) => db.advance_pin(pin),
        Err(e) => tracing::warn!(error = %e, "store: cannot read the policy pin"),
    }
}

/// A connection of its own, listening on [`CHANNEL`] and the pin's channel; notifications
/// arrive on the receiver, which closes when the connection is lost.
async fn listen(db: &Db) -> Result<(Client, mpsc::UnboundedReceiver<Note>), StoreError> {
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
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {}", super::pin::CHANNEL))
        .await?;
    Ok((client, seqs))
}

/// Drives the listening connection, passing on each notification.
async fn forward<S, T>(mut connection: Connection<S, T>, out: mpsc::UnboundedSender<Note>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
        match message {
            Ok(AsyncMessage::Notification(n)) if n.channel() == super::pin::CHANNEL => {
                let _ = out.send(Note::Pin);
            }
            Ok(AsyncMessage::Notification(n)) => {
                if let Ok(seq) = n.payload().parse() {
                    let _ = out.send(Note::Revoked(seq));
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
