//! Publishing revocations: X.509 CRLs signed by the CAs of the bundle (`GET /v1/crl`) and the
//! feed relying parties follow (`GET /v1/revocations?since=SEQ`, long-polled). Promises: a CRL
//! lists every revoked certificate the store holds that has not expired, as of its signing; the
//! CRLs are signed again after every revocation (on this replica before the revoking request is
//! answered), when the CA set changes, and when half of their validity has passed; CRL numbers
//! only grow, across restarts too (they are derived from the signing time in milliseconds).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;

use crate::identity::{CaSet, CrlEntry, IdentityError, Serial, pem_encode};
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
    /// The signing CA's fingerprint (SHA-256 of its certificate, hex).
    pub ca: String,
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
    /// Entries listed.
    pub entries: usize,
}

/// The CRLs in force: one per CA of the bundle (the active CA's first), all listing every
/// revoked, unexpired certificate. (A serial is 128 random bits, so listing another CA's
/// certificate in a CRL is harmless, and a relying party can take any CA's CRL without knowing
/// which CA issued what during a rotation.)
#[derive(Debug, Clone)]
pub struct Crls {
    /// The CRLs, the active CA's first.
    pub by_ca: Vec<Crl>,
    /// The feed position they cover: every revocation up to it is listed (unless expired).
    pub head: u64,
    /// The bundle sequence of the CA set that signed them.
    pub sequence: u64,
}

impl Crls {
    /// The active CA's CRL.
    pub fn active(&self) -> Option<&Crl> {
        self.by_ca.first()
    }

    /// The CRL of the CA with this fingerprint.
    pub fn of(&self, ca: &str) -> Option<&Crl> {
        self.by_ca.iter().find(|crl| crl.ca == ca)
    }

    /// Every CRL, PEM, one after the other (what `openssl crl` and most relying parties load).
    pub fn pem(&self) -> Bytes {
        Bytes::from(
            self.by_ca
                .iter()
                .flat_map(|crl| crl.pem.iter().copied())
                .collect::<Vec<u8>>(),
        )
    }
}

/// Keeps the CRLs in force and signs the next.
#[derive(Debug)]
pub struct Publisher {
    current: RwLock<Arc<Crls>>,
    /// One signing at a time, so numbers and heads only move forward.
    signing: tokio::sync::Mutex<()>,
    validity: Duration,
}

impl Publisher {
    /// Signs the first CRLs from what the store holds.
    pub async fn start(
        store: &dyn Store,
        trust: &CaSet,
        validity: Duration,
    ) -> Result<Self, RevocationError> {
        let first = sign(store, trust, validity, 0).await?;
        Ok(Self {
            current: RwLock::new(Arc::new(first)),
            signing: tokio::sync::Mutex::new(()),
            validity,
        })
    }

    /// The CRLs in force.
    pub fn current(&self) -> Arc<Crls> {
        match self.current.read() {
            Ok(crls) => crls.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs new CRLs when the store has revocations the current ones lack, the CA set
    /// changed, or half of their validity has passed. Returns the CRLs in force afterwards.
    pub async fn refresh(
        &self,
        store: &dyn Store,
        trust: &CaSet,
    ) -> Result<Arc<Crls>, RevocationError> {
        if self.fresh(store, trust).is_some() {
            return Ok(self.current());
        }
        let _one_at_a_time = self.signing.lock().await;
        if let Some(current) = self.fresh(store, trust) {
            return Ok(current);
        }
        let previous = self
            .current()
            .by_ca
            .iter()
            .map(|crl| crl.number)
            .max()
            .unwrap_or(0);
        let next = Arc::new(sign(store, trust, self.validity, previous).await?);
        tracing::info!(
            head = next.head,
            cas = next.by_ca.len(),
            entries = next.by_ca.first().map_or(0, |crl| crl.entries),
            "CRL signed"
        );
        match self.current.write() {
            Ok(mut slot) => *slot = next.clone(),
            Err(poisoned) => *poisoned.into_inner() = next.clone(),
        }
        Ok(next)
    }

    /// The current CRLs if nothing asks for new ones.
    fn fresh(&self, store: &dyn Store, trust: &CaSet) -> Option<Arc<Crls>> {
        let current = self.current();
        let head = *store.revocation_head().borrow();
        let now = unix(SystemTime::now());
        let signed = current.by_ca.first().map_or(0, |crl| crl.this_update);
        let half_life = self.validity.as_secs() / 2;
        (head == current.head
            && current.sequence == trust.sequence()
            && now < signed.saturating_add(half_life))
        .then_some(current)
    }

    /// Keeps the CRLs current until `stop`: after every revocation the store reports (from any
    /// request on this replica, a superseding join included) and at half of their validity.
    /// `revoked` hears how many revocations each move of the store's head published.
    pub async fn run(
        &self,
        store: Arc<dyn Store>,
        trust: impl Fn() -> Arc<CaSet>,
        revoked: impl Fn(u64),
        mut stop: watch::Receiver<bool>,
    ) {
        let mut heads = store.revocation_head();
        let mut last = *heads.borrow_and_update();
        let recheck = (self.validity / 2).max(Duration::from_secs(30));
        loop {
            let head = *heads.borrow_and_update();
            revoked(head.saturating_sub(last));
            last = last.max(head);
            if let Err(e) = self.refresh(store.as_ref(), &trust()).await {
                tracing::error!(error = %e, "cannot sign the CRL; serving the last one");
            }
            tokio::select! {
                changed = heads.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(recheck) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Signs, with every CA of `trust`, a CRL of every unexpired revocation, numbered above
/// `previous`.
async fn sign(
    store: &dyn Store,
    trust: &CaSet,
    validity: Duration,
    previous: u64,
) -> Result<Crls, RevocationError> {
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
    let active = trust.active();
    let signers = std::iter::once(active).chain(
        trust
            .cas()
            .iter()
            .map(|trusted| &trusted.ca)
            .filter(|ca| ca.fingerprint() != active.fingerprint()),
    );
    let mut by_ca = Vec::new();
    for ca in signers {
        let der = ca.crl(&entries, number, now, next_update)?;
        by_ca.push(Crl {
            ca: ca.fingerprint().to_string(),
            pem: Bytes::from(pem_encode("X509 CRL", &der)),
            der: Bytes::from(der),
            number,
            this_update: unix(now),
            next_update: unix(next_update),
            entries: entries.len(),
        });
    }
    Ok(Crls {
        by_ca,
        head,
        sequence: trust.sequence(),
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
