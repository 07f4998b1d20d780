//! A paced request/response load on loopback: each round trip is one segment received by the server
//! and one by the client, i.e. two `tcp:tcp_probe` events. Bounded: it stops when dropped.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;

const MSG: usize = 64;
/// Short-lived connections opened and closed per second.
const CHURN_PER_S: f64 = 200.0;

pub struct EchoLoad {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoLoad {
    /// `connections` client/server pairs on 127.0.0.1 sharing `round_trips_per_s`.
    pub fn start(connections: usize, round_trips_per_s: u64) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let per_conn = (round_trips_per_s as f64 / connections.max(1) as f64).max(1.0);
        for _ in 0..connections {
            let mut client = TcpStream::connect(addr)?;
            let (mut server, _) = listener.accept()?;
            client.set_nodelay(true)?;
            server.set_nodelay(true)?;
            server.set_read_timeout(Some(Duration::from_millis(200)))?;
            client.set_read_timeout(Some(Duration::from_millis(200)))?;
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; MSG];
                while !s.load(Ordering::Relaxed) {
                    match server.read_exact(&mut buf) {
                        Ok(()) => {
                            if server.write_all(&buf).is_err() {
                                return;
                            }
                        }
                        // Idle client (between paced requests): look at the stop flag again.
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                }
            }));
            let (s, d) = (stop.clone(), done.clone());
            threads.push(std::thread::spawn(move || {
                let msg = [0x42u8; MSG];
                let mut buf = [0u8; MSG];
                let t0 = Instant::now();
                let mut n = 0u64;
                while !s.load(Ordering::Relaxed) {
                    let due = Duration::from_secs_f64(n as f64 / per_conn);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    if client.write_all(&msg).is_err() || client.read_exact(&mut buf).is_err() {
                        return;
                    }
                    n += 1;
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Connection churn, so the state-change program runs too: connect, one message, close.
        let (s, churn_listener) = (stop.clone(), TcpListener::bind("127.0.0.1:0")?);
        let churn_addr = churn_listener.local_addr()?;
        churn_listener.set_nonblocking(true)?;
        threads.push(std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let due = Duration::from_secs_f64(n as f64 / CHURN_PER_S);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
                if let Ok(mut c) = TcpStream::connect(churn_addr) {
                    let _ = c.write_all(&[1u8; MSG]);
                }
                while let Ok((c, _)) = churn_listener.accept() {
                    drop(c);
                }
                n += 1;
            }
        }));
        Ok(Self {
            stop,
            done,
            threads,
        })
    }

    pub fn round_trips(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for EchoLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
