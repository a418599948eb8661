//! What a CIDR argument or list entry may be: a bare address is a host
//! route; host bits, IPv4-mapped IPv6 and blanks are refused, naming the fix.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::{IpNet, Ipv4Net};

/// Why a single CIDR argument or list entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Neither `ADDRESS/PREFIX` nor a bare address.
    #[error(
        "`{input}` is not an IP address or CIDR (expected e.g. 203.0.113.0/24 or 2001:db8::/32)"
    )]
    Unparsable { input: String },
    /// The address parses but the prefix length does not fit its family.
    #[error("`{input}`: the prefix length must be a number from 0 to {max} for IPv{}", if *max == 32 { 4 } else { 6 })]
    PrefixLength { input: String, max: u8 },
    /// Bits beyond the prefix length are set, so the intent is ambiguous.
    #[error("`{input}` has host bits set; the network is `{network}`")]
    HostBitsSet { input: String, network: IpNet },
    /// An IPv4-mapped IPv6 prefix, which no packet on the wire carries.
    #[error(
        "`{input}` is an IPv4-mapped IPv6 address, which never appears as a packet source; write {}",
        ipv4.map_or_else(|| "the IPv4 CIDR instead".to_owned(), |n| format!("`{n}`"))
    )]
    Ipv4Mapped { input: String, ipv4: Option<Ipv4Net> },
    /// A blank in the text (a quoted argument, a config string): no CIDR has
    /// one, and naming the prefix length or the syntax would mislead.
    #[error(
        "`{}` has {}: {}",
        input.escape_debug(),
        Blank(input),
        without.as_ref().map_or_else(|e| format!("and without it, {e}"), |n| format!("write `{n}`"))
    )]
    Whitespace { input: String, without: Result<IpNet, Box<CidrError>> },
}

/// Which blank `input` has, and where: "a trailing space".
struct Blank<'a>(&'a str);

impl fmt::Display for Blank<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(blank) = self.0.chars().find(|c| c.is_whitespace()) else {
            return f.write_str("no blank");
        };
        let place = if self.0.starts_with(blank) {
            "a leading"
        } else if self.0.ends_with(blank) {
            "a trailing"
        } else {
            "a"
        };
        match blank {
            ' ' => write!(f, "{place} space"),
            '\t' => write!(f, "{place} tab"),
            // What a file written on Windows leaves at the end of each line.
            '\r' => write!(f, "{place} carriage return (\\r, a Windows line end)"),
            '\n' => write!(f, "{place} line break"),
            other => write!(f, "{place} blank (U+{:04X})", u32::from(other)),
        }
    }
}

/// Parses a CIDR or bare address as the list and the CLI accept it.
pub fn parse_cidr(input: &str) -> Result<IpNet, CidrError> {
    if input.contains(char::is_whitespace) {
        let without: String = input.chars().filter(|c| !c.is_whitespace()).collect();
        let without = parse_cidr(&without).map_err(Box::new);
        return Err(CidrError::Whitespace { input: input.to_owned(), without });
    }
    let cidr = match IpNet::from_str(input) {
        Ok(cidr) => cidr,
        Err(_) => match input.split_once('/').map(|(address, _)| IpAddr::from_str(address)) {
            Some(Ok(address)) => {
                let max = if address.is_ipv4() { 32 } else { 128 };
                return Err(CidrError::PrefixLength { input: input.to_owned(), max });
            }
            Some(Err(_)) => return Err(CidrError::Unparsable { input: input.to_owned() }),
            None => IpAddr::from_str(input)
                .map(IpNet::from)
                .map_err(|_| CidrError::Unparsable { input: input.to_owned() })?,
        },
    };
    if cidr.trunc() != cidr {
        return Err(CidrError::HostBitsSet { input: input.to_owned(), network: cidr.trunc() });
    }
    if let IpNet::V6(v6) = cidr
        && v6.prefix_len() >= 96
        && v6.network().to_ipv4_mapped().is_some()
    {
        let ipv4 = v6
            .network()
            .to_ipv4_mapped()
            .and_then(|addr| Ipv4Net::new(addr, v6.prefix_len() - 96).ok());
        return Err(CidrError::Ipv4Mapped { input: input.to_owned(), ipv4 });
    }
    Ok(cidr)
}
