//! The webhook target address classifier, shared by the API (which refuses such targets
//! at submit time) and the webhook sender (which refuses them on the address it actually
//! dials, so DNS rebinding cannot get around the submit-time check).
//!
//! A webhook may never reach the machine itself, the private networks behind it, the
//! cloud metadata service (link-local) or any address that is not a unicast host on the
//! public internet. IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible,
//! NAT64, 6to4) are judged by the IPv4 address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True when a webhook must not be sent to `ip` (unless private targets are allowed).
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn in_v4_net(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    const NETS: [([u8; 4], u32); 14] = [
        ([0, 0, 0, 0], 8),       // "this network", includes the unspecified 0.0.0.0
        ([10, 0, 0, 0], 8),      // RFC 1918
        ([100, 64, 0, 0], 10),   // carrier-grade NAT (RFC 6598)
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local, where cloud metadata services live
        ([172, 16, 0, 0], 12),   // RFC 1918
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // documentation (TEST-NET-1)
        ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast (RFC 7526)
        ([192, 168, 0, 0], 16),  // RFC 1918
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // documentation (TEST-NET-2)
        ([203, 0, 113, 0], 24),  // documentation (TEST-NET-3)
        ([224, 0, 0, 0], 3),     // multicast 224/4 and reserved 240/4 with broadcast
    ];
    NETS.iter()
        .any(|(net, prefix)| in_v4_net(ip, *net, *prefix))
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_forbidden_v4(v4);
    }
    let seg = ip.segments();
    ip.is_unspecified()
        || ip.is_loopback()
        || seg[0] & 0xff00 == 0xff00 // multicast ff00::/8
        || seg[0] & 0xffc0 == 0xfe80 // link-local fe80::/10
        || seg[0] & 0xffc0 == 0xfec0 // deprecated site-local fec0::/10
        || seg[0] & 0xfe00 == 0xfc00 // unique local fc00::/7
        || (seg[0] == 0x2001 && seg[1] == 0x0000) // Teredo: hides an arbitrary IPv4 peer
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x3fff && seg[1] < 0x1000) // documentation 3fff::/20 (RFC 9637)
        || (seg[0] == 0x2001 && seg[1] < 0x30) // Teredo, benchmarking, ORCHID(v2) in 2001::/23
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0]) // discard-only 100::/64
}

/// The IPv4 address an IPv6 address stands for, when it is one of the forms that
/// carries one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let low = Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    );
    // IPv4-mapped ::ffff:a.b.c.d
    if seg[..5] == [0, 0, 0, 0, 0] && seg[5] == 0xffff {
        return Some(low);
    }
    // IPv4-translated ::ffff:0:a.b.c.d (SIIT, RFC 6052/7915)
    if seg[..4] == [0, 0, 0, 0] && seg[4] == 0xffff && seg[5] == 0 {
        return Some(low);
    }
    // IPv4-compatible ::a.b.c.d (deprecated), but not :: and ::1 themselves
    if seg[..6] == [0, 0, 0, 0, 0, 0] && !(seg[6] == 0 && seg[7] <= 1) {
        return Some(low);
    }
    // NAT64 well-known prefix 64:ff9b::/96 and local-use 64:ff9b:1::/48
    if (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0])
        || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1)
    {
        return Some(low);
    }
    // 6to4 2002:AABB:CCDD::/48
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(raw: &str) -> bool {
        is_forbidden_ip(raw.parse().unwrap())
    }

    #[test]
    fn refuses_every_internal_ipv4_range() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
            "169.254.169.254",
            "169.254.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
        ] {
            assert!(forbidden(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn allows_public_ipv4_next_to_the_ranges() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.255.255",
            "169.255.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.167.255.255",
            "192.169.0.1",
            "223.255.255.255",
        ] {
            assert!(!forbidden(ip), "{ip} is public");
        }
    }

    #[test]
    fn refuses_internal_ipv6_ranges() {
        for ip in [
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fc00::1",
            "fd12:3456:789a::1",
            "ff02::1",
            "ff0e::1",
            "2001:db8::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
            "3fff::1",
            "3fff:fff::1",
            "2001:10::1",
            "2001:20::1",
        ] {
            assert!(forbidden(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn judges_ipv6_forms_of_ipv4_by_their_ipv4() {
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::10.1.2.3",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::c0a8:1",
            "2002:7f00:1::1",
            "2002:c0a8:0101::1",
            "::ffff:0:127.0.0.1",
            "::ffff:0:a9fe:a9fe",
        ] {
            assert!(forbidden(ip), "{ip} must be refused");
        }
        for ip in [
            "::ffff:8.8.8.8",
            "::ffff:0:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert!(!forbidden(ip), "{ip} carries a public IPv4");
        }
    }

    #[test]
    fn allows_public_ipv6() {
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:4860::1",
            "2001:4860:4860::8888",
            "2001:200::1",
            "2400:cb00::1",
        ] {
            assert!(!forbidden(ip), "{ip} is public");
        }
    }
}
