//! The example policies from `policies/`, compiled by the build and embedded in the binary so
//! that `omnirelay init` and `omnirelay demo` work without a policy repository.

/// Where the build wrote every compiled policy, fixtures included. Only meaningful on the
/// machine that built this binary: for this workspace's tests and benchmarks.
pub const BUILT_POLICY_DIR: &str = env!("OMNIRELAY_POLICY_DIR");

/// `cluster-role`: admits listed clusters and roles.
pub const CLUSTER_ROLE: &[u8] =
    include_bytes!(concat!(env!("OMNIRELAY_POLICY_DIR"), "/cluster_role.wasm"));

/// `posture`: admits devices whose verified posture meets the settings.
pub const POSTURE: &[u8] = include_bytes!(concat!(env!("OMNIRELAY_POLICY_DIR"), "/posture.wasm"));

/// `deny-all`: refuses everything.
pub const DENY_ALL: &[u8] = include_bytes!(concat!(env!("OMNIRELAY_POLICY_DIR"), "/deny_all.wasm"));
