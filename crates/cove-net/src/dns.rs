//! The DNS forwarder that egress sandboxes use, and the resolver cove uses
//! itself when a sandbox is created.
//!
//! Each egress sandbox's `/etc/resolv.conf` names the bridge's address;
//! the daemon answers there (UDP and TCP, port 53). A query is matched to
//! its sandbox by source address (sandboxes cannot forge it: they have
//! neither CAP_NET_RAW nor CAP_NET_ADMIN, and the bridge port is theirs),
//! and answered only when the sandbox's policy resolves the name
//! ([`Policy::resolves`]); otherwise the answer is REFUSED and nothing is
//! sent upstream. AAAA queries get an empty answer (egress is IPv4 only),
//! so clients fall back to IPv4 at once. When the sandbox has an allow
//! list, the IPv4 addresses of each answer are added to its `<id>-dns` set
//! *before* the answer goes back, so the connection that follows passes.
//!
//! Upstream servers are the host's (`/etc/resolv.conf`) unless the daemon
//! is told otherwise (`--dns-upstream`).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, PacketFlag, QCLASS, QTYPE, Question, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use crate::Shared;

/// How long one upstream server gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a UDP query may take to answer before it is dropped.
const UDP_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries answered at once; more are dropped (the client retries).
const MAX_IN_FLIGHT: usize = 256;

/// The forwarder's tasks; dropping it stops them.
#[derive(Debug)]
pub struct DnsServer {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serve DNS on `addr`:53 for the sandboxes in `shared`.
pub(crate) async fn serve(addr: Ipv4Addr, shared: Arc<Shared>) -> io::Result<DnsServer> {
    let udp = Arc::new(UdpSocket::bind((addr, 53)).await?);
    let tcp = TcpListener::bind((addr, 53)).await?;
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let udp_task = {
        let shared = shared.clone();
        let limit = limit.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let SocketAddr::V4(from) = from else {
                    continue;
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    continue;
                };
                let (shared, udp, query) = (shared.clone(), udp.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    // A client has given up long before; a stuck `nft`
                    // must not hold a permit for ever.
                    let answered = tokio::time::timeout(
                        UDP_ANSWER_TIMEOUT,
                        answer(&shared, *from.ip(), &query, false),
                    );
                    if let Ok(Some(reply)) = answered.await {
                        let _ = udp.send_to(&reply, from).await;
                    }
                    drop(permit);
                });
            }
        })
    };
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((stream, from)) = tcp.accept().await else {
                continue;
            };
            let SocketAddr::V4(from) = from else {
                continue;
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    serve_tcp(stream, &shared, *from.ip()),
                )
                .await;
                drop(permit);
            });
        }
    });
    Ok(DnsServer {
        tasks: vec![udp_task, tcp_task],
    })
}

async fn serve_tcp(mut stream: TcpStream, shared: &Shared, client: Ipv4Addr) -> io::Result<()> {
    loop {
        let len = match stream.read_u16().await {
            Ok(len) => len as usize,
            Err(_) => return Ok(()),
        };
        let mut query = vec![0u8; len];
        stream.read_exact(&mut query).await?;
        let Some(reply) = answer(shared, client, &query, true).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_u16(len).await?;
        stream.write_all(&reply).await?;
    }
}

/// A reply to `query` with no answers and `rcode`.
fn reply(query: &simple_dns::Packet<'_>, rcode: RCODE) -> Option<Vec<u8>> {
    let mut reply = simple_dns::Packet::new_reply(query.id());
    reply.questions = query.questions.clone();
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    *reply.rcode_mut() = rcode;
    reply.build_bytes_vec().ok()
}

/// The answer to `query` from `client`, or `None` to stay silent.
async fn answer(shared: &Shared, client: Ipv4Addr, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let packet = simple_dns::Packet::parse(query).ok()?;
    if packet.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let [question] = packet.questions.as_slice() else {
        return reply(&packet, RCODE::FormatError);
    };
    let name = question.qname.to_string().to_ascii_lowercase();
    let Some(sandbox) = shared.client(client) else {
        return reply(&packet, RCODE::Refused);
    };
    if !sandbox.policy.resolves(&name) {
        tracing::debug!(id = %sandbox.id, %name, "DNS query refused by policy");
        return reply(&packet, RCODE::Refused);
    }
    if question.qtype == QTYPE::TYPE(TYPE::AAAA) {
        return reply(&packet, RCODE::NoError);
    }
    let started = std::time::Instant::now();
    let response = match forward(&shared.upstream, query, tcp).await {
        Ok(response) => response,
        Err(err) => {
            tracing::warn!(id = %sandbox.id, %name, %err, "DNS forwarding failed");
            return reply(&packet, RCODE::ServerFailure);
        }
    };
    if sandbox.policy.is_allow_list() {
        let addrs = a_records(&response);
        if !addrs.is_empty()
            && let Err(err) = shared
                .nft
                .apply(&shared.nft.dns_script(&sandbox.id, &addrs))
                .await
        {
            tracing::warn!(id = %sandbox.id, %name, %err, "cannot open resolved addresses");
            return reply(&packet, RCODE::ServerFailure);
        }
    }
    tracing::debug!(
        id = %sandbox.id,
        %name,
        ms = started.elapsed().as_millis() as u64,
        "DNS query answered"
    );
    Some(response)
}

/// IPv4 addresses in the answer section of `response`.
fn a_records(response: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(packet) = simple_dns::Packet::parse(response) else {
        return Vec::new();
    };
    packet
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) if rr.class == CLASS::IN => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

/// Send `query` to the first upstream server that answers. Over UDP; a
/// truncated answer is asked again over TCP when the client itself came
/// over TCP (a UDP client then retries over TCP on its own).
async fn forward(upstream: &[SocketAddr], query: &[u8], tcp: bool) -> Result<Vec<u8>, String> {
    if upstream.is_empty() {
        return Err("no upstream DNS server is configured".into());
    }
    let id = query.get(..2).ok_or("query too short")?;
    let mut errors = Vec::new();
    for server in upstream {
        match ask_udp(*server, query, id).await {
            Ok(response) => {
                let truncated = response.get(2).is_some_and(|b| b & 0x02 != 0);
                if truncated && tcp {
                    match ask_tcp(*server, query).await {
                        Ok(full) => return Ok(full),
                        Err(e) => errors.push(format!("{server} (tcp): {e}")),
                    }
                }
                return Ok(response);
            }
            Err(e) => errors.push(format!("{server}: {e}")),
        }
    }
    Err(errors.join("; "))
}

async fn ask_udp(server: SocketAddr, query: &[u8], id: &[u8]) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 2s"))??;
        if buf.get(..2) == Some(id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
        stream.write_u16(len).await?;
        stream.write_all(query).await?;
        let len = stream.read_u16().await? as usize;
        let mut response = vec![0u8; len];
        stream.read_exact(&mut response).await?;
        Ok(response)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 2s"))?
}

/// Why a name could not be resolved at create time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The name does not exist, or has no IPv4 address.
    Unknown(String),
    /// No upstream server answered.
    Unreachable(String),
}

/// The IPv4 addresses of `name`, asked of `upstream`.
pub async fn resolve(upstream: &[SocketAddr], name: &str) -> Result<Vec<Ipv4Addr>, ResolveError> {
    let id: u16 = rand::random();
    let mut query = simple_dns::Packet::new_query(id);
    query.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname = Name::new(name).map_err(|e| ResolveError::Unknown(e.to_string()))?;
    query.questions.push(Question::new(
        qname,
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let bytes = query
        .build_bytes_vec()
        .map_err(|e| ResolveError::Unknown(e.to_string()))?;
    let response = forward(upstream, &bytes, true)
        .await
        .map_err(ResolveError::Unreachable)?;
    let packet = simple_dns::Packet::parse(&response)
        .map_err(|e| ResolveError::Unreachable(format!("a malformed answer: {e}")))?;
    match packet.rcode() {
        RCODE::NoError => {}
        RCODE::NameError => return Err(ResolveError::Unknown("no such name (NXDOMAIN)".into())),
        other => {
            return Err(ResolveError::Unreachable(format!(
                "the DNS server answered {other:?}"
            )));
        }
    }
    let addrs = a_records(&response);
    if addrs.is_empty() {
        Err(ResolveError::Unknown("it has no IPv4 address".into()))
    } else {
        Ok(addrs)
    }
}

/// Name servers listed in a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|addr| addr.split('%').next()?.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn resolv_conf_servers() {
        let text = "# comment\nnameserver 10.0.0.53\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            nameservers(text),
            vec![
                "10.0.0.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn refusals_echo_the_question() {
        let mut query = simple_dns::Packet::new_query(77);
        query.set_flags(PacketFlag::RECURSION_DESIRED);
        query.questions.push(Question::new(
            Name::new("a.test").unwrap(),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = reply(&query, RCODE::Refused).unwrap();
        let parsed = simple_dns::Packet::parse(&bytes).unwrap();
        assert_eq!(parsed.id(), 77);
        assert_eq!(parsed.rcode(), RCODE::Refused);
        assert!(parsed.has_flags(PacketFlag::RESPONSE));
        assert_eq!(parsed.questions[0].qname.to_string(), "a.test");
    }
}
