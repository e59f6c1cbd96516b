//! Publishing revocations: the X.509 CRL signed by the CA (`GET /v1/crl`) and the feed relying
//! parties follow (`GET /v1/revocations?since=SEQ`, long-polled). Promises: the CRL lists every
//! revoked certificate the store holds that has not expired, as of its generation; it is signed
//! again after every revocation (on this replica before the revoking request is answered) and
//! when half of its validity has passed; CRL numbers only grow, across restarts too (they are
//! derived from the signing time in milliseconds).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;

use crate::identity::{Ca, CrlEntry, IdentityError, Serial, pem_encode};
use crate::store::{Store, StoreError};

/// Most entries one page of the feed carries.
pub const MAX_FEED_PAGE: u32 = 1000;
/// Longest a feed request waits for a new revocation.
pub const MAX_FEED_WAIT: Duration = Duration::from_secs(30);

/// The CRL could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The store could not be read.
    #[error("reading the revocations: {0}")]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("signing the CRL: {0}")]
    Sign(#[from] IdentityError),
    /// A stored serial does not parse (the database was edited).
    #[error("revoked serial {0:?} does not parse")]
    Serial(String),
}

/// One signed CRL.
#[derive(Debug, Clone)]
pub struct Crl {
    /// DER.
    pub der: Bytes,
    /// PEM (`X509 CRL`).
    pub pem: Bytes,
    /// Its CRL number.
    pub number: u64,
    /// thisUpdate, Unix seconds.
    pub this_update: u64,
    /// nextUpdate, Unix seconds.
    pub next_update: u64,
    /// The feed position it covers: every revocation up to this one is in it (unless expired).
    pub head: u64,
    /// Entries listed.
    pub entries: usize,
}

/// Keeps the current CRL and signs the next.
#[derive(Debug)]
pub struct Publisher {
    current: RwLock<Arc<Crl>>,
    /// One signing at a time, so numbers and heads only move forward.
    signing: tokio::sync::Mutex<()>,
    validity: Duration,
}

impl Publisher {
    /// Signs the first CRL from what the store holds.
    pub async fn start(
        store: &dyn Store,
        ca: &Ca,
        validity: Duration,
    ) -> Result<Self, RevocationError> {
        let first = sign(store, ca, validity, 0).await?;
        Ok(Self {
            current: RwLock::new(Arc::new(first)),
            signing: tokio::sync::Mutex::new(()),
            validity,
        })
    }

    /// The CRL in force.
    pub fn current(&self) -> Arc<Crl> {
        match self.current.read() {
            Ok(crl) => crl.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs a new CRL when the store has revocations the current one lacks, or when half of
    /// its validity has passed. Returns the CRL in force afterwards.
    pub async fn refresh(&self, store: &dyn Store, ca: &Ca) -> Result<Arc<Crl>, RevocationError> {
        let _one_at_a_time = self.signing.lock().await;
        let current = self.current();
        let head = *store.revocation_head().borrow();
        let now = unix(SystemTime::now());
        let half_life = self.validity.as_secs() / 2;
        if head == current.head && now < current.this_update.saturating_add(half_life) {
            return Ok(current);
        }
        let next = Arc::new(sign(store, ca, self.validity, current.number).await?);
        tracing::info!(
            number = next.number,
            entries = next.entries,
            head = next.head,
            "CRL signed"
        );
        match self.current.write() {
            Ok(mut slot) => *slot = next.clone(),
            Err(poisoned) => *poisoned.into_inner() = next.clone(),
        }
        Ok(next)
    }

    /// Keeps the CRL current until `stop`: after every revocation the store reports (from any
    /// request on this replica, a superseding join included) and at half of its validity.
    pub async fn run(
        &self,
        store: Arc<dyn Store>,
        ca: &Ca,
        mut stop: watch::Receiver<bool>,
        on_signed: impl Fn(&Crl),
    ) {
        let mut heads = store.revocation_head();
        let recheck = (self.validity / 2).max(Duration::from_secs(30));
        loop {
            match self.refresh(store.as_ref(), ca).await {
                Ok(crl) => on_signed(&crl),
                Err(e) => tracing::error!(error = %e, "cannot sign the CRL; serving the last one"),
            }
            tokio::select! {
                changed = heads.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(recheck) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Signs a CRL of every unexpired revocation, numbered above `previous`.
async fn sign(
    store: &dyn Store,
    ca: &Ca,
    validity: Duration,
    previous: u64,
) -> Result<Crl, RevocationError> {
    let now = SystemTime::now();
    let (revoked, head) = store.unexpired_revocations(unix(now)).await?;
    let entries = revoked
        .iter()
        .map(|r| {
            Ok(CrlEntry {
                serial: Serial::parse_hex(&r.serial)
                    .map_err(|_| RevocationError::Serial(r.serial.clone()))?,
                revoked_at: UNIX_EPOCH + Duration::from_secs(r.revoked_at),
                superseded: r.reason == "superseded",
            })
        })
        .collect::<Result<Vec<_>, RevocationError>>()?;
    let millis = u64::try_from(
        now.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis(),
    )
    .unwrap_or(u64::MAX);
    let number = millis.max(previous.saturating_add(1));
    let next_update = now + validity;
    let der = ca.crl(&entries, number, now, next_update)?;
    let pem = pem_encode("X509 CRL", &der);
    Ok(Crl {
        der: Bytes::from(der),
        pem: Bytes::from(pem),
        number,
        this_update: unix(now),
        next_update: unix(next_update),
        head,
        entries: entries.len(),
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
