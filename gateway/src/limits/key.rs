//! The key a client is limited by: an IPv4 address, or the /64 an IPv6 address lies in (one
//! subscriber usually holds a whole /64, so keying per address would hand one client 2^64
//! budgets). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack socket reports
//! for an IPv4 peer) are the IPv4 address they carry.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The unit every per-client limit counts by (rate, open connections, joins in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    /// One IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 /64: the first 64 bits of the address.
    V6Prefix(u64),
}

impl ClientKey {
    /// The key of a client connecting from `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        Self::of(ip)
    }
}

/// `192.0.2.1`, or `2001:db8:1:2::/64`: what the audit and the logs show.
impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(v4) => fmt::Display::fmt(v4, f),
            Self::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v6(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_is_keyed_by_address() {
        let a = ClientKey::of(v6("192.0.2.1"));
        assert_eq!(a, ClientKey::V4(Ipv4Addr::new(192, 0, 2, 1)));
        assert_ne!(a, ClientKey::of(v6("192.0.2.2")));
        assert_eq!(a.to_string(), "192.0.2.1");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_address() {
        assert_eq!(
            ClientKey::of(v6("::ffff:1.2.3.4")),
            ClientKey::of(v6("1.2.3.4"))
        );
        assert_eq!(ClientKey::of(v6("::ffff:1.2.3.4")).to_string(), "1.2.3.4");
        // IPv4-compatible (deprecated, `::a.b.c.d`) is an IPv6 address like any other.
        assert_eq!(ClientKey::of(v6("::1.2.3.4")).to_string(), "::/64");
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_bit_prefix() {
        let a = ClientKey::of(v6("2001:db8:1:2::1"));
        assert_eq!(a, ClientKey::of(v6("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert_ne!(a, ClientKey::of(v6("2001:db8:1:3::1")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    }

    proptest! {
        #[test]
        fn two_addresses_in_one_64_share_a_key(prefix: u64, a: u64, b: u64) {
            let ip = |low: u64| IpAddr::V6(Ipv6Addr::from((u128::from(prefix) << 64) | u128::from(low)));
            // Inside ::ffff:0:0/96 (prefix 0) the mapped IPv4 address is the key instead.
            prop_assume!(prefix != 0 || (a >> 32 != 0xffff && b >> 32 != 0xffff));
            prop_assert_eq!(ClientKey::of(ip(a)), ClientKey::of(ip(b)));
            prop_assert_eq!(ClientKey::of(ip(a)), ClientKey::V6Prefix(prefix));
        }

        #[test]
        fn addresses_in_different_64s_have_different_keys(a: u128, b: u128) {
            prop_assume!(a >> 64 != b >> 64);
            let (x, y) = (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b)));
            prop_assume!(x.to_canonical().is_ipv6() && y.to_canonical().is_ipv6());
            prop_assert_ne!(ClientKey::of(x), ClientKey::of(y));
        }

        #[test]
        fn a_mapped_address_keys_as_its_ipv4_address(v4: u32) {
            let v4 = Ipv4Addr::from(v4);
            prop_assert_eq!(ClientKey::of(IpAddr::V6(v4.to_ipv6_mapped())), ClientKey::of(IpAddr::V4(v4)));
        }

        #[test]
        fn the_shown_key_parses_back_to_the_same_key(a: u128, v4: bool) {
            let ip = if v4 { IpAddr::V4(Ipv4Addr::from(a as u32)) } else { IpAddr::V6(Ipv6Addr::from(a)) };
            let key = ClientKey::of(ip);
            let shown = key.to_string();
            let back: IpAddr = shown.trim_end_matches("/64").parse().unwrap();
            prop_assert_eq!(ClientKey::of(back), key);
        }
    }
}
