//! Socket backlog through sock_diag netlink (the interface `ss` uses): accept-queue length and limit
//! of listening sockets, and receive/send queue bytes of the connections they serve. A netlink socket
//! sees the network namespace it was created in, so the reader is created inside the watched one.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::SocketAddr,
    path::Path,
};

use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};
use tokenflow_schema::{BacklogWindow, ListenerBacklog, PortQueues};

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;

pub struct BacklogReader {
    socket: Socket,
    ports: BTreeSet<u16>,
}

impl BacklogReader {
    /// A reader for the namespace at `netns` (a /run/netns or /proc/PID/ns/net path), or the
    /// agent's own when `None`. `ports` limits the report to these listening ports when not empty.
    pub fn new(netns: Option<&Path>, ports: &[u16]) -> Result<Self> {
        let socket = match netns {
            None => open_socket()?,
            Some(path) => {
                let file = File::open(path)
                    .with_context(|| format!("opening netns {}", path.display()))?;
                // Namespaces are per thread: create the socket on a thread that moved there.
                std::thread::spawn(move || -> Result<Socket> {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns")?;
                    open_socket()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("netns thread panicked"))??
            }
        };
        Ok(Self {
            socket,
            ports: ports.iter().copied().collect(),
        })
    }

    /// Reads every TCP socket once and summarises listeners and their connections.
    pub fn sample(&mut self) -> BacklogWindow {
        match self.dump() {
            Ok(sockets) => summarise(&sockets, &self.ports),
            Err(e) => BacklogWindow {
                error: Some(format!("{e:#}")),
                ..Default::default()
            },
        }
    }

    fn dump(&mut self) -> Result<Vec<InetResponseHeader>> {
        let mut all = Vec::new();
        for family in [AF_INET, AF_INET6] {
            // Listeners first: the kernel finds them in its small listening hash. Connections it
            // finds by walking the whole established hash — every bucket, whatever the filter:
            // about 1 ms per family on a host with 262144 buckets, the agent's largest cost per
            // window — so only for a family with a watched listener, whose connections (of the
            // listener's family) are the ones reported.
            let from = all.len();
            self.request(family, StateFlags::LISTEN)?;
            self.receive(&mut all)?;
            if all[from..]
                .iter()
                .any(|s| watched(&self.ports, s.socket_id.source_port))
            {
                self.request(family, StateFlags::ESTABLISHED)?;
                self.receive(&mut all)?;
            }
        }
        Ok(all)
    }

    fn request(&mut self, family: u8, states: StateFlags) -> Result<()> {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let mut packet = NetlinkMessage::new(
            hdr,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf[..]);
        self.socket
            .send(&buf[..], 0)
            .context("sending the sock_diag request")?;
        Ok(())
    }

    fn receive(&mut self, out: &mut Vec<InetResponseHeader>) -> Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let size = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .context("reading sock_diag replies")?;
            let mut offset = 0;
            while offset < size {
                let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                    .context("parsing a sock_diag reply")?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        out.push(r.header)
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => bail!("sock_diag error: {e:?}"),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

fn open_socket() -> Result<Socket> {
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).context("opening a NETLINK_SOCK_DIAG socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&NlAddr::new(0, 0))
        .context("connecting the netlink socket")?;
    Ok(socket)
}

/// A port the report covers: one of `only`, or any when `only` is empty.
fn watched(only: &BTreeSet<u16>, port: u16) -> bool {
    only.is_empty() || only.contains(&port)
}

/// Listeners, and established connections grouped by the listening port they belong to.
pub fn summarise(sockets: &[InetResponseHeader], only: &BTreeSet<u16>) -> BacklogWindow {
    let wanted = |p: u16| watched(only, p);
    let mut listeners = Vec::new();
    let mut listen_ports = BTreeSet::new();
    for s in sockets
        .iter()
        .filter(|s| s.state == TCP_LISTEN && wanted(s.socket_id.source_port))
    {
        let local = SocketAddr::new(s.socket_id.source_address, s.socket_id.source_port);
        listen_ports.insert(s.socket_id.source_port);
        listeners.push(ListenerBacklog {
            local: local.to_string(),
            port: s.socket_id.source_port,
            // For a listener, sock_diag's rqueue is the accept queue and wqueue its limit.
            accept_queue: s.recv_queue,
            accept_queue_limit: s.send_queue,
        });
    }
    let mut ports: BTreeMap<u16, PortQueues> = BTreeMap::new();
    for s in sockets.iter().filter(|s| s.state == TCP_ESTABLISHED) {
        let port = s.socket_id.source_port;
        if !listen_ports.contains(&port) {
            continue;
        }
        let q = ports.entry(port).or_insert_with(|| PortQueues {
            port,
            ..Default::default()
        });
        q.connections += 1;
        q.recv_queue_bytes += u64::from(s.recv_queue);
        q.recv_queue_max_bytes = q.recv_queue_max_bytes.max(s.recv_queue);
        q.send_queue_bytes += u64::from(s.send_queue);
        q.send_queue_max_bytes = q.send_queue_max_bytes.max(s.send_queue);
    }
    BacklogWindow {
        listeners,
        ports: ports.into_values().collect(),
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    /// A listener nobody accepts from, in this process's namespace: the accept queue holds every
    /// client that connected (the kernel completes the handshake itself).
    #[test]
    fn accept_queue_counts_waiting_clients() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let mut reader = BacklogReader::new(None, &[port]).unwrap();
        let w = reader.sample();
        assert_eq!(w.error, None);
        assert_eq!(w.listeners.len(), 1, "{w:?}");
        assert_eq!(w.listeners[0].accept_queue, 5);
        assert!(w.listeners[0].accept_queue_limit >= 5);
        // Accepting takes one out of the queue.
        let (mut a, _) = listener.accept().unwrap();
        use std::io::Write;
        let mut c = &clients[0];
        c.write_all(&[7u8; 1000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let w = reader.sample();
        assert_eq!(w.listeners[0].accept_queue, 4);
        assert_eq!(w.ports.len(), 1);
        // Queued connections are established sockets too: 1 accepted + 4 waiting.
        assert_eq!(w.ports[0].connections, 5);
        assert_eq!(
            w.ports[0].recv_queue_bytes, 1000,
            "unread bytes wait in the receive queue"
        );
        a.flush().unwrap();
    }

    /// Connections are read per family, only for a family with a watched listener: an IPv6
    /// listener's connections are IPv6 sockets, counted; the IPv4 listener on another port is not
    /// watched, and neither are its connections.
    #[test]
    fn connections_are_read_for_the_watched_listeners_family() {
        use std::io::Write;
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let port = v6.local_addr().unwrap().port();
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c6 = TcpStream::connect(v6.local_addr().unwrap()).unwrap();
        let _c4 = TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        c6.write_all(&[1u8; 300]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let w = BacklogReader::new(None, &[port]).unwrap().sample();
        assert_eq!(w.error, None);
        assert_eq!(w.listeners.len(), 1, "{w:?}");
        assert_eq!(w.ports.len(), 1, "{w:?}");
        assert_eq!((w.ports[0].port, w.ports[0].connections), (port, 1));
        assert_eq!(w.ports[0].recv_queue_bytes, 300);
    }

    #[test]
    fn summary_ignores_other_ports() {
        let id = |port| SocketId {
            source_port: port,
            destination_port: 0,
            source_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            destination_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            interface_id: 0,
            cookie: [0; 8],
        };
        let h = |port, state, rq, wq| InetResponseHeader {
            family: AF_INET,
            state,
            timer: None,
            socket_id: id(port),
            recv_queue: rq,
            send_queue: wq,
            uid: 0,
            inode: 0,
        };
        let socks = [
            h(80, TCP_LISTEN, 3, 128),
            h(22, TCP_LISTEN, 1, 128),
            h(80, TCP_ESTABLISHED, 10, 20),
        ];
        let w = summarise(&socks, &[80].into_iter().collect());
        assert_eq!(w.listeners.len(), 1);
        assert_eq!(
            (
                w.listeners[0].accept_queue,
                w.listeners[0].accept_queue_limit
            ),
            (3, 128)
        );
        assert_eq!(w.ports[0].send_queue_bytes, 20);
    }
}
