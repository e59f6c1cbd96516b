//! Guest-side glue used by [`crate::export_policy!`]: the wit-bindgen bindings, conversions
//! between them and the SDK's plain types, the allocator and the panic handler. Not public API.

#![allow(missing_docs)]
#![allow(unsafe_code)] // wit-bindgen emits the canonical ABI glue as unsafe code

use crate::types as sdk;
use alloc::vec::Vec;

pub use alloc::string::String;

pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "::policy_sdk::__private::bindings",
        runtime_path: "::policy_sdk::__private::wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use bindings::export;
pub use bindings::exports::omnirelay::bootstrap_policy::evaluator::Guest;
pub use wit_bindgen;

use bindings::omnirelay::bootstrap_policy::host::{self, LogLevel};
use bindings::omnirelay::bootstrap_policy::types as wit;

pub type WitRequest = wit::Request;
pub type WitDecision = wit::Decision;
pub type WitPolicyError = wit::PolicyError;

/// Every instance lives for one call, so the heap is a bump allocator: the fastest possible
/// allocation, and memory is reclaimed when the gateway drops the instance.
#[global_allocator]
static ALLOCATOR: heap::Bump = heap::Bump::new();

/// Reports the panic to the gateway's log, then traps. Formats into a fixed buffer: the heap may
/// be what failed.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::sync::atomic::{AtomicBool, Ordering};
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let mut buf = FixedBuf {
            bytes: [0; 512],
            len: 0,
        };
        let _ = core::fmt::write(&mut buf, format_args!("policy panicked: {info}"));
        if let Ok(text) = core::str::from_utf8(&buf.bytes[..buf.len]) {
            host::log(LogLevel::Error, text, &[]);
        }
    }
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator entry point. On `wasm32-wasip2`, wit-bindgen expects wasi-libc
/// to provide it, and a `no_std` policy links no libc.
///
/// # Safety
/// Called only by the component runtime, with the canonical ABI's contract: `old_ptr`/`old_len`
/// describe a block this function returned earlier (or are zero), `align` is a power of two.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: the runtime passes a power-of-two alignment and a previous block's layout.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable()
    }
    ptr
}

struct FixedBuf {
    bytes: [u8; 512],
    len: usize,
}

impl core::fmt::Write for FixedBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // Truncate on a character boundary so the result stays valid UTF-8.
        let room = self.bytes.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

pub fn evaluate<P: crate::Policy>(
    settings: &str,
    request: WitRequest,
) -> Result<WitDecision, WitPolicyError> {
    match crate::run_evaluate::<P>(settings, &request.into()) {
        Ok(decision) => Ok(decision.into()),
        Err(error) => Err(wit::PolicyError {
            message: error.message,
        }),
    }
}

/// Sends a structured log line to the gateway (used by [`crate::log`]).
pub fn log(level: crate::LogLevel, message: &str, fields: &[(String, String)]) {
    let level = match level {
        crate::LogLevel::Trace => LogLevel::Trace,
        crate::LogLevel::Debug => LogLevel::Debug,
        crate::LogLevel::Info => LogLevel::Info,
        crate::LogLevel::Warn => LogLevel::Warn,
        crate::LogLevel::Error => LogLevel::Error,
    };
    host::log(level, message, fields);
}

impl From<wit::Request> for sdk::Request {
    fn from(r: wit::Request) -> Self {
        // WIT 0.1.0 has no `manual` case: the gateway sends it as `join` with an extension.
        let manual = r
            .extensions
            .iter()
            .any(|kv| kv.key == sdk::EXT_REQUEST_KIND && kv.value == "manual");
        Self {
            kind: match r.kind {
                wit::RequestKind::Join if manual => sdk::RequestKind::Manual,
                wit::RequestKind::Join => sdk::RequestKind::Join,
                wit::RequestKind::Renew => sdk::RequestKind::Renew,
            },
            token: sdk::TokenClaims {
                audit_id: r.token.audit_id,
                cluster: r.token.cluster,
                role: r.token.role,
                trust_domain: r.token.trust_domain,
                not_before: r.token.not_before,
                expires_at: r.token.expires_at,
                max_uses: r.token.max_uses,
                uses_left: r.token.uses_left,
            },
            attestation: sdk::Attestation {
                kind: match r.attestation.kind {
                    wit::AttestationKind::TokenOnly => sdk::AttestationKind::TokenOnly,
                    wit::AttestationKind::X509pop => sdk::AttestationKind::X509pop,
                },
                verified: claims(r.attestation.verified),
                self_reported: claims(r.attestation.self_reported),
                issued_at_ms: r.attestation.issued_at_ms,
            },
            csr: sdk::CsrFacts {
                key_algorithm: match r.csr.key_algorithm {
                    wit::KeyAlgorithm::EcdsaP256 => sdk::KeyAlgorithm::EcdsaP256,
                    wit::KeyAlgorithm::EcdsaP384 => sdk::KeyAlgorithm::EcdsaP384,
                    wit::KeyAlgorithm::Ed25519 => sdk::KeyAlgorithm::Ed25519,
                    wit::KeyAlgorithm::Rsa => sdk::KeyAlgorithm::Rsa,
                    wit::KeyAlgorithm::Other => sdk::KeyAlgorithm::Other,
                },
                key_bits: r.csr.key_bits,
                requested_dns_names: r.csr.requested_dns_names,
                requested_uris: r.csr.requested_uris,
            },
            node_name: r.node_name,
            client_address: r.client_address,
            now_ms: r.now_ms,
            extensions: r
                .extensions
                .into_iter()
                .map(|kv| sdk::Kv {
                    key: kv.key,
                    value: kv.value,
                })
                .collect(),
        }
    }
}

fn claims(list: Vec<wit::Claim>) -> Vec<sdk::Claim> {
    list.into_iter()
        .map(|c| sdk::Claim {
            name: c.name,
            value: match c.value {
                wit::ClaimValue::Flag(b) => sdk::ClaimValue::Flag(b),
                wit::ClaimValue::Integer(i) => sdk::ClaimValue::Integer(i),
                wit::ClaimValue::Text(t) => sdk::ClaimValue::Text(t),
            },
        })
        .collect()
}

impl From<sdk::Decision> for wit::Decision {
    fn from(d: sdk::Decision) -> Self {
        match d {
            sdk::Decision::Allow(a) => wit::Decision::Allow(wit::Allow {
                spiffe_path: a.spiffe_path,
                ttl_seconds: a.ttl_seconds,
                dns_sans: a.dns_sans,
                obligations: a
                    .obligations
                    .into_iter()
                    .map(|o| match o {
                        sdk::Obligation::RenewAfterSeconds(s) => {
                            wit::Obligation::RenewAfterSeconds(s)
                        }
                        sdk::Obligation::AuditNote(n) => wit::Obligation::AuditNote(n),
                    })
                    .collect(),
                matched_rules: a.matched_rules,
            }),
            sdk::Decision::Deny(d) => wit::Decision::Deny(wit::Deny {
                code: d.code,
                reason: d.reason,
                node_message: d.node_message,
                retry_after_seconds: d.retry_after_seconds,
            }),
        }
    }
}

/// The guest heap.
///
/// Allocation bumps a pointer, starting at the linker's `__heap_base`, inside the memory the
/// module starts with (`--initial-heap`, which this crate's build script passes to the
/// linker), growing it a page at a time only when that is used up. Freeing or growing the most
/// recent block is done in place (the pattern of a growing `Vec` or `String`); other frees are
/// left for the end of the call.
/// Growing memory costs the host page-protection changes, so staying inside the initial heap
/// is what keeps a fresh instance cheap.
mod heap {
    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32;
    use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    const PAGE: usize = 65536;

    unsafe extern "C" {
        /// First byte after the data segments and the shadow stack (set by wasm-ld).
        static __heap_base: u8;
    }

    pub struct Bump {
        /// Next free byte; 0 until the first allocation.
        next: AtomicUsize,
    }

    impl Bump {
        pub const fn new() -> Self {
            Self {
                next: AtomicUsize::new(0),
            }
        }

        fn top(&self) -> usize {
            match self.next.load(Relaxed) {
                // Only the address of the linker symbol is taken, never its value: safe.
                0 => &raw const __heap_base as usize,
                n => n,
            }
        }

        /// Moves the top to `end`, growing memory if needed; false when the host refuses.
        fn claim(&self, end: usize) -> bool {
            let have = wasm32::memory_size(0) * PAGE;
            if end > have && wasm32::memory_grow(0, (end - have).div_ceil(PAGE)) == usize::MAX {
                return false;
            }
            self.next.store(end, Relaxed);
            true
        }
    }

    // SAFETY: blocks never overlap (the top only moves past a block, or back to the start of
    // the most recent one when it is freed), and every block is aligned as its layout asks.
    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let start = self.top().next_multiple_of(layout.align());
            match start.checked_add(layout.size()) {
                Some(end) if self.claim(end) => start as *mut u8,
                _ => core::ptr::null_mut(),
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if ptr as usize + layout.size() == self.top() {
                self.next.store(ptr as usize, Relaxed);
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let start = ptr as usize;
            if start + layout.size() == self.top() {
                return match start.checked_add(new_size) {
                    Some(end) if self.claim(end) => ptr,
                    _ => core::ptr::null_mut(),
                };
            }
            // SAFETY: `layout.align()` is a valid alignment and `new_size` is non-zero, as the
            // `GlobalAlloc::realloc` contract guarantees.
            let moved =
                unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
            if !moved.is_null() {
                // SAFETY: both blocks are live, distinct and at least this long.
                unsafe { core::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            }
            moved
        }
    }
}
