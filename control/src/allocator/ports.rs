//! The ports an allocator gives its instances (proxy, service, metrics), from a range of its
//! own outside the kernel's ephemeral range, as Nomad does: the kernel never hands these out
//! for port-0 binds, and the allocator hands each out once until its instance is gone, so two
//! instances never race for a port. A port another program happens to hold is skipped (each
//! is checked by binding it, TCP and UDP, before it is given out).

use std::{collections::BTreeSet, ops::RangeInclusive};

/// The default range: below Linux's default ephemeral range (32768-60999).
pub const DEFAULT_RANGE: RangeInclusive<u16> = 20000..=29999;

/// The three ports of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstancePorts {
    /// The proxy's ingress (TCP) and data plane (QUIC, UDP).
    pub proxy: u16,
    /// The port the service listens on (`SERVICE_PORT`).
    pub service: u16,
    /// The port of the proxy's /metrics, which the allocator reads to cull idle instances.
    pub metrics: u16,
}

impl InstancePorts {
    fn all(&self) -> [u16; 3] {
        [self.proxy, self.service, self.metrics]
    }
}

/// Parses `FIRST-LAST`.
pub fn parse_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("'{text}' is not a port range: write FIRST-LAST, e.g. 20000-29999");
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let (first, last): (u16, u16) = (
        first.trim().parse().map_err(|_| bad())?,
        last.trim().parse().map_err(|_| bad())?,
    );
    if first == 0 || first > last || usize::from(last - first) < 2 {
        return Err(format!(
            "port range {text} must hold at least three ports, none of them 0"
        ));
    }
    Ok(first..=last)
}

/// Refuses a range that overlaps the kernel's ephemeral range (`first-last`, as in
/// /proc/sys/net/ipv4/ip_local_port_range), where port-0 binds of any program could take our
/// ports.
pub fn check_outside_ephemeral(
    range: &RangeInclusive<u16>,
    ephemeral: RangeInclusive<u16>,
) -> Result<(), String> {
    if range.start() <= ephemeral.end() && ephemeral.start() <= range.end() {
        return Err(format!(
            "port range {}-{} overlaps the kernel's ephemeral ports {}-{} \
             (/proc/sys/net/ipv4/ip_local_port_range): choose another --port-range",
            range.start(),
            range.end(),
            ephemeral.start(),
            ephemeral.end()
        ));
    }
    Ok(())
}

/// The kernel's ephemeral port range, if it can be read.
pub fn kernel_ephemeral_range() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut numbers = text.split_whitespace().map(|n| n.parse::<u16>());
    Some(numbers.next()?.ok()?..=numbers.next()?.ok()?)
}

/// Ports handed out, and where to look next (round robin, so a port just freed is not reused
/// at once while a late packet may still arrive for it).
#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    used: BTreeSet<u16>,
    next: u16,
}

impl PortPool {
    /// A pool of the ports in `range`, none taken, handing out from its first port on.
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self {
            next: *range.start(),
            range,
            used: BTreeSet::new(),
        }
    }

    /// Three ports for a new instance, each one `is_free` says can be bound; `None` when the
    /// range has too few left.
    pub fn take(&mut self, mut is_free: impl FnMut(u16) -> bool) -> Option<InstancePorts> {
        let size = usize::from(self.range.end() - self.range.start()) + 1;
        let mut chosen = Vec::with_capacity(3);
        for _ in 0..size {
            let port = self.next;
            self.next = if port == *self.range.end() {
                *self.range.start()
            } else {
                port + 1
            };
            if !self.used.contains(&port) && is_free(port) {
                chosen.push(port);
                if chosen.len() == 3 {
                    let ports = InstancePorts {
                        proxy: chosen[0],
                        service: chosen[1],
                        metrics: chosen[2],
                    };
                    self.used.extend(ports.all());
                    return Some(ports);
                }
            }
        }
        None
    }

    /// Marks the ports of an instance found running (adopted after a restart) as taken.
    pub fn mark_used(&mut self, ports: InstancePorts) {
        self.used.extend(ports.all());
    }

    /// Gives an instance's ports back; they are handed out again once the round robin comes
    /// back to them.
    pub fn release(&mut self, ports: InstancePorts) {
        for port in ports.all() {
            self.used.remove(&port);
        }
    }
}

/// Whether `port` can be bound right now on every interface, TCP and UDP.
pub fn bindable(port: u16) -> bool {
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    std::net::TcpListener::bind((any, port)).is_ok()
        && std::net::UdpSocket::bind((any, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_handed_out_once_until_released() {
        let mut pool = PortPool::new(20000..=20005);
        let a = pool.take(|_| true).unwrap();
        let b = pool.take(|_| true).unwrap();
        assert_eq!(
            a,
            InstancePorts {
                proxy: 20000,
                service: 20001,
                metrics: 20002
            }
        );
        assert_eq!(
            b,
            InstancePorts {
                proxy: 20003,
                service: 20004,
                metrics: 20005
            }
        );
        assert_eq!(pool.take(|_| true), None, "the range is used up");
        pool.release(a);
        assert_eq!(pool.take(|_| true), Some(a));
    }

    #[test]
    fn ports_others_hold_are_skipped_and_adopted_ones_kept() {
        let mut pool = PortPool::new(20000..=20009);
        pool.mark_used(InstancePorts {
            proxy: 20000,
            service: 20001,
            metrics: 20002,
        });
        let ports = pool.take(|port| port != 20004).unwrap();
        assert_eq!(
            ports,
            InstancePorts {
                proxy: 20003,
                service: 20005,
                metrics: 20006
            }
        );
    }

    #[test]
    fn ranges_are_parsed_and_checked_against_the_ephemeral_range() {
        assert_eq!(parse_range("20000-29999").unwrap(), 20000..=29999);
        assert!(parse_range("20000").is_err());
        assert!(parse_range("3-1").is_err());
        assert!(parse_range("5-6").unwrap_err().contains("three ports"));
        assert!(check_outside_ephemeral(&(20000..=29999), 32768..=60999).is_ok());
        let error = check_outside_ephemeral(&(30000..=40000), 32768..=60999).unwrap_err();
        assert!(error.contains("ip_local_port_range"), "{error}");
    }
}
