//! Name resolution for status callbacks. A callback URL naming a link-local or unspecified
//! address is refused when it is given; one naming a host is checked here, at each
//! delivery, so a name that resolves to a cloud metadata service (or to 0.0.0.0) cannot
//! reach what the same URL with the address written out could not.

use std::net::SocketAddr;

use confroute_shared::options::callback_address_refused;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The webhook client's resolver: the system's, less the addresses a callback may not reach.
pub struct CallbackResolver;

impl Resolve for CallbackResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept = allowed(found);
            if kept.is_empty() {
                return Err(Box::new(Refused(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// A callback host that resolves only to addresses no callback is sent to: sending again
/// would be refused again.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` resolves only to link-local or unspecified addresses, where no status callback is sent"
)]
pub struct Refused(pub String);

/// The addresses of `found` a status callback may be sent to, in their order.
fn allowed(found: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    found
        .filter(|a| !callback_address_refused(a.ip()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn link_local_and_unspecified_answers_are_dropped() {
        let found = [
            addr("169.254.169.254:0"),
            addr("10.0.0.7:0"),
            addr("[fe80::1]:0"),
            addr("0.0.0.0:0"),
            addr("[::ffff:169.254.1.1]:0"),
            addr("[2001:db8::1]:0"),
        ];
        assert_eq!(
            allowed(found.into_iter()),
            vec![addr("10.0.0.7:0"), addr("[2001:db8::1]:0")]
        );
        assert!(allowed([addr("169.254.169.254:0")].into_iter()).is_empty());
    }

    /// Through the system's resolver: a name whose addresses are allowed resolves as before.
    #[tokio::test]
    async fn a_name_with_allowed_addresses_resolves() {
        let name: Name = "localhost".parse().expect("name");
        let addrs: Vec<SocketAddr> = CallbackResolver
            .resolve(name)
            .await
            .expect("localhost resolves")
            .collect();
        assert!(addrs.iter().any(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
