//! Where a webhook may connect. A URL names a host, but what matters is the address the post
//! connects to: a literal such as `[::ffff:127.0.0.1]` is this machine in IPv6 dress, and a
//! name may resolve to loopback (`/etc/hosts`) or change its answer between a check and the
//! connection (DNS rebinding). So the rule is applied to addresses, in one place:
//! [`is_public`] decides whether an address is globally routable; [`Reach`] adds the
//! operator's `webhooks.allow_internal` networks; [`Guarded`] applies it to every address a
//! name resolves to, as the HTTP client connects; and [`Reach::check_url`] applies it to
//! literal hosts, which the client never resolves.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// IPv4 networks that are not globally routable (the IANA special-purpose registry, with
/// multicast and the reserved class E), so a webhook never reaches them by default.
const NOT_PUBLIC_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network"
    (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),   // shared address space (carrier-grade NAT)
    (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local, where cloud metadata services answer
    (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation
    (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast (deprecated)
    (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation
    (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation
    (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, and the broadcast address
];

/// Global IPv6 unicast is 2000::/3 (everything outside it, loopback, unique-local, link-local,
/// multicast and the rest, is not); inside it, these are not globally routable either.
const NOT_PUBLIC_V6: &[(Ipv6Addr, u8)] = &[
    // IETF protocol assignments: Teredo (2001::/32), benchmarking, ORCHID and a few anycast
    // services, none of them a webhook receiver.
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),     // documentation
];

/// Whether `address` is globally routable, so that a webhook may reach it without the
/// operator's say. An IPv6 address that carries an IPv4 one (IPv4-mapped, IPv4-compatible,
/// NAT64 64:ff9b::/96, 6to4 2002::/16) is judged by that IPv4 address: the packets end up there.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => !NOT_PUBLIC_V4
            .iter()
            .any(|&(net, prefix)| v4_within(v4, net, prefix)),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                v6_within(v6, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3)
                    && !NOT_PUBLIC_V6
                        .iter()
                        .any(|&(net, prefix)| v6_within(v6, net, prefix))
            }
        },
    }
}

/// The IPv4 address an IPv6 one stands for, if it is of a form that embeds one.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let [a, b, c, d, e, f, g, h] = v6.segments();
    let tail = Ipv4Addr::from(((g as u32) << 16) | h as u32);
    match (a, b, c, d, e, f) {
        (0, 0, 0, 0, 0, 0xffff) => Some(tail), // IPv4-mapped
        // IPv4-compatible (deprecated); :: and ::1 fold to 0.0.0.0 and 0.0.0.1, not public
        // either.
        (0, 0, 0, 0, 0, 0) => Some(tail),
        (0x64, 0xff9b, 0, 0, 0, 0) => Some(tail), // NAT64, the well-known prefix
        (0x2002, ..) => Some(Ipv4Addr::from(((b as u32) << 16) | c as u32)), // 6to4
        _ => None,
    }
}

fn v4_within(address: Ipv4Addr, network: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
    u32::from(address) & mask == u32::from(network) & mask
}

fn v6_within(address: Ipv6Addr, network: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
    u128::from(address) & mask == u128::from(network) & mask
}

/// A network in CIDR notation (`10.1.0.0/16`, `fd00::/8`), or one address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("`{0}` is not an IP address or a network such as 10.1.0.0/16")]
    Malformed(String),
    #[error("`{0}`: the prefix length must be from 0 to {1}")]
    Prefix(String, u8),
    #[error("`{given}` has bits set past its prefix; the network is {network}")]
    HostBits { given: String, network: Network },
}

impl Network {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => v4_within(a, net, self.prefix),
            (IpAddr::V6(net), IpAddr::V6(a)) => v6_within(a, net, self.prefix),
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Network, NetworkError> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| NetworkError::Malformed(text.to_owned()))?;
        let most = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= most)
                .ok_or(NetworkError::Prefix(text.to_owned(), most))?,
        };
        let network = Network { address, prefix };
        // 10.1.2.3/16 is more likely a typo than a way to write 10.1.0.0/16: say which was meant.
        let base = match address {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if base != address {
            return Err(NetworkError::HostBits {
                given: text.to_owned(),
                network: Network {
                    address: base,
                    prefix,
                },
            });
        }
        Ok(network)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// Why a webhook was not sent to an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is not a public address")]
    Address(IpAddr),
    #[error("{host} resolves only to addresses that are not public, such as {address}")]
    Resolved { host: String, address: IpAddr },
}

/// The addresses a webhook may connect to: public ones, and those in `internal` (the
/// operator's `webhooks.allow_internal`, for the operator's own receivers).
#[derive(Debug, Clone, Default)]
pub struct Reach {
    internal: Arc<[Network]>,
}

impl Reach {
    /// Public addresses only: what an account's own `callback_url` may reach.
    pub fn public() -> Reach {
        Reach::default()
    }

    /// Public addresses and `internal`.
    pub fn with_internal(internal: Vec<Network>) -> Reach {
        Reach {
            internal: internal.into(),
        }
    }

    pub fn permits(&self, address: IpAddr) -> bool {
        // An IPv4-mapped address is connected to as its IPv4 address: it matches the IPv4
        // networks the operator listed.
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        is_public(address) || self.internal.iter().any(|n| n.contains(address))
    }

    /// Checks a URL whose host is an IP address, which an HTTP client connects to without
    /// resolving anything. A name passes here: [`Guarded`] checks what it resolves to.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        // The URL parser has already turned every IPv4 spelling (`2130706433`, `0x7f.1`)
        // into dotted decimal; an IPv6 host keeps its brackets.
        let host = url.host_str().unwrap_or("").trim_matches(['[', ']']);
        let Ok(address) = host.parse::<IpAddr>() else {
            return Ok(());
        };
        if self.permits(address) {
            Ok(())
        } else {
            Err(Refused::Address(address))
        }
    }
}

/// A resolver that hands the HTTP client only the addresses [`Reach`] permits, and fails when
/// none is left. The client connects to exactly what it hands over, for every new connection,
/// so an answer that changes between lookups (DNS rebinding) is checked each time.
pub struct Guarded {
    inner: Arc<dyn Resolve>,
    reach: Reach,
}

impl Guarded {
    /// Resolves with the system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
    pub fn system(reach: Reach) -> Guarded {
        Guarded::over(Arc::new(System), reach)
    }

    /// Filters what `inner` answers.
    pub fn over(inner: Arc<dyn Resolve>, reach: Reach) -> Guarded {
        Guarded { inner, reach }
    }
}

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let reach = self.reach.clone();
        let resolving = self.inner.resolve(name);
        Box::pin(async move {
            let (permitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolving
                .await?
                .partition(|address| reach.permits(address.ip()));
            match (permitted.is_empty(), refused.first()) {
                (true, Some(first)) => Err(Refused::Resolved {
                    host,
                    address: first.ip(),
                }
                .into()),
                _ => Ok(Box::new(permitted.into_iter()) as Addrs),
            }
        })
    }
}

/// The system's resolver, as reqwest's default, through tokio's blocking pool.
struct System;

impl Resolve for System {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(Box::new(addresses.collect::<Vec<_>>().into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn only_globally_routable_addresses_are_public() {
        let cases = [
            // IPv4: each special-purpose range, at its edges.
            ("0.0.0.0", false),
            ("0.255.255.255", false),
            ("1.1.1.1", true),
            ("8.8.8.8", true),
            ("9.255.255.255", true),
            ("10.0.0.1", false),
            ("10.255.255.255", false),
            ("11.0.0.0", true),
            ("100.63.255.255", true),
            ("100.64.0.0", false),
            ("100.127.255.255", false),
            ("100.128.0.0", true),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("169.254.169.254", false),
            ("172.15.255.255", true),
            ("172.16.0.0", false),
            ("172.31.255.255", false),
            ("172.32.0.0", true),
            ("192.0.0.8", false),
            ("192.0.2.1", false),
            ("192.88.99.1", false),
            ("192.167.255.255", true),
            ("192.168.1.1", false),
            ("192.169.0.0", true),
            ("198.17.255.255", true),
            ("198.18.0.0", false),
            ("198.19.255.255", false),
            ("198.20.0.0", true),
            ("198.51.100.7", false),
            ("203.0.113.9", false),
            ("223.255.255.255", true),
            ("224.0.0.1", false),
            ("239.255.255.250", false),
            ("240.0.0.1", false),
            ("255.255.255.255", false),
            // IPv6 carrying IPv4: judged by the IPv4 address.
            ("::ffff:127.0.0.1", false),
            ("::ffff:7f00:1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("::ffff:100.64.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("::127.0.0.1", false),
            ("::10.0.0.1", false),
            ("::8.8.8.8", true),
            ("64:ff9b::7f00:1", false),
            ("64:ff9b::a9fe:a9fe", false),
            ("64:ff9b::808:808", true),
            ("2002:7f00:1::", false),
            ("2002:a00:1::1", false),
            ("2002:808:808::1", true),
            // IPv6.
            ("::", false),
            ("::1", false),
            ("64:ff9b:1::a00:1", false),
            ("100::1", false),
            ("2001::1", false),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false),
            ("2001:1ff:ffff::1", false),
            ("2001:200::1", true),
            ("2001:db8::1", false),
            ("2001:4860:4860::8888", true),
            ("2606:4700:4700::1111", true),
            ("3ffe::1", true),
            ("3fff::1", false),
            ("4000::1", false),
            ("5f00::1", false),
            ("fc00::1", false),
            ("fd00::2", false),
            ("fe80::1", false),
            ("fec0::1", false),
            ("ff02::1", false),
            ("ff0e::1", false),
        ];
        for (text, public) in cases {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(is_public(address), public, "{text}");
        }
    }

    #[test]
    fn networks_are_parsed_strictly_and_match_their_family() {
        let net: Network = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.7".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::ffff:10.1.0.1".parse().unwrap()));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));

        assert_eq!(
            "10.1.2.3/16".parse::<Network>(),
            Err(NetworkError::HostBits {
                given: "10.1.2.3/16".into(),
                network: "10.1.0.0/16".parse().unwrap(),
            })
        );
        for bad in [
            "10.1.0.0/33",
            "::/129",
            "10.1.0.0/",
            "10.1.0.0/x",
            "localhost",
            "",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_allow_list_adds_networks_and_a_mapped_address_counts_as_ipv4() {
        let reach = Reach::with_internal(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(reach.permits("127.0.0.1".parse().unwrap()));
        assert!(reach.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!reach.permits("127.0.0.2".parse().unwrap()));
        assert!(!reach.permits("::1".parse().unwrap()));
        assert!(reach.permits("8.8.8.8".parse().unwrap()));
        assert!(!Reach::public().permits("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_literal_host_is_checked_and_a_name_is_left_to_the_resolver() {
        let public = Reach::public();
        for url in [
            "http://127.0.0.1:8081/admin",
            "http://[::ffff:127.0.0.1]:8081/",
            "http://[::ffff:7f00:1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://2130706433/",
            "http://0x7f.1/",
        ] {
            let url = reqwest::Url::parse(url).unwrap();
            assert!(
                matches!(public.check_url(&url), Err(Refused::Address(_))),
                "{url}"
            );
        }
        let name = reqwest::Url::parse("http://localhost:8081/").unwrap();
        assert_eq!(public.check_url(&name), Ok(()));
        let global = reqwest::Url::parse("https://[2606:4700:4700::1111]/").unwrap();
        assert_eq!(public.check_url(&global), Ok(()));
    }

    /// Answers each lookup with the next of its answers: a name whose address changes
    /// between lookups, as DNS rebinding makes it.
    struct Answers {
        answers: Vec<Vec<IpAddr>>,
        asked: AtomicUsize,
    }

    impl Resolve for Answers {
        fn resolve(&self, _: Name) -> Resolving {
            let n = self.asked.fetch_add(1, Ordering::SeqCst);
            let answer = self.answers[n.min(self.answers.len() - 1)].clone();
            Box::pin(async move {
                Ok(Box::new(answer.into_iter().map(|ip| SocketAddr::new(ip, 0))) as Addrs)
            })
        }
    }

    fn answers(answers: &[&[&str]]) -> Arc<Answers> {
        Arc::new(Answers {
            answers: answers
                .iter()
                .map(|a| a.iter().map(|ip| ip.parse().unwrap()).collect())
                .collect(),
            asked: AtomicUsize::new(0),
        })
    }

    async fn resolve(resolver: &Guarded, host: &str) -> Result<Vec<IpAddr>, String> {
        match resolver.resolve(host.parse().unwrap()).await {
            Ok(addresses) => Ok(addresses.map(|a| a.ip()).collect()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn each_lookup_is_filtered_so_a_rebinding_name_is_refused_the_second_time() {
        let guarded = Guarded::over(
            answers(&[
                &["93.184.216.34"],
                &["127.0.0.1"],
                &["::ffff:7f00:1", "::1"],
            ]),
            Reach::public(),
        );
        assert_eq!(
            resolve(&guarded, "rebind.example").await,
            Ok(vec!["93.184.216.34".parse().unwrap()])
        );
        assert_eq!(
            resolve(&guarded, "rebind.example").await,
            Err(
                "rebind.example resolves only to addresses that are not public, such as 127.0.0.1"
                    .into()
            )
        );
        assert!(resolve(&guarded, "rebind.example").await.is_err());
    }

    #[tokio::test]
    async fn refused_addresses_are_dropped_and_the_rest_kept() {
        let guarded = Guarded::over(
            answers(&[&["127.0.0.1", "2606:4700:4700::1111", "10.0.0.1"]]),
            Reach::public(),
        );
        assert_eq!(
            resolve(&guarded, "mixed.example").await,
            Ok(vec!["2606:4700:4700::1111".parse().unwrap()])
        );
        let internal = Guarded::over(
            answers(&[&["127.0.0.1", "10.0.0.1"]]),
            Reach::with_internal(vec!["10.0.0.0/8".parse().unwrap()]),
        );
        assert_eq!(
            resolve(&internal, "hooks.internal").await,
            Ok(vec!["10.0.0.1".parse().unwrap()])
        );
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost_and_the_guard_refuses_it() {
        let guarded = Guarded::system(Reach::public());
        let refused = resolve(&guarded, "localhost").await.unwrap_err();
        assert!(refused.starts_with("localhost resolves only to addresses that are not public"));
        let allowed = Guarded::system(Reach::with_internal(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1".parse().unwrap(),
        ]));
        let found = resolve(&allowed, "localhost").await.unwrap();
        assert!(found.iter().all(|a| a.is_loopback()) && !found.is_empty());
    }
}
