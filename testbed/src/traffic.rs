//! Real TCP traffic for the test bed: endpoints inside namespaces and paced senders. A socket belongs to the namespace it was created in,
//! so it is created on a thread inside that namespace and then used from anywhere.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::in_netns;
use anyhow::{Context, Result};

/// Accepts connections in a namespace and reads everything they send.
pub struct DiscardServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl DiscardServer {
    pub fn start(ns: &str, addr: SocketAddr) -> Result<Self> {
        let listener = in_netns(ns, move || TcpListener::bind(addr).context("bind"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let (s, r) = (s.clone(), r.clone());
                        let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
                        conns.push(std::thread::spawn(move || {
                            let mut buf = vec![0u8; 65536];
                            while !s.load(Ordering::Relaxed) {
                                match c.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        r.fetch_add(n as u64, Ordering::Relaxed);
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            ErrorKind::WouldBlock | ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(Self {
            addr,
            stop,
            received,
            thread: Some(thread),
        })
    }
}

impl Drop for DiscardServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside namespace `ns` (the connecting thread belongs to this process).
pub fn connect_from(ns: &str, to: SocketAddr) -> Result<TcpStream> {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).context("connect")
    })
}

/// Writes `chunk`-byte blocks at about `bytes_per_s` for `duration`; returns the bytes written.
pub fn send_paced(
    stream: &mut TcpStream,
    bytes_per_s: u64,
    chunk: usize,
    duration: Duration,
) -> Result<u64> {
    let buf = vec![0x5au8; chunk];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < duration {
        stream.write_all(&buf)?;
        sent += chunk as u64;
        let due = Duration::from_secs_f64(sent as f64 / bytes_per_s as f64);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

/// A connection that keeps sending on its own thread until dropped: `rate` bytes/s, or as fast as
/// the network takes them when `None` (a bulk flow).
pub struct Sender {
    pub local_port: u16,
    stop: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    /// Connects from inside `ns` and runs `body` on its own thread until the sender is dropped;
    /// `body` gets the stream, the stop flag and the counter of bytes written.
    fn spawn(
        ns: &str,
        to: SocketAddr,
        body: impl FnOnce(TcpStream, &AtomicBool, &AtomicU64) + Send + 'static,
    ) -> Result<Self> {
        let stream = connect_from(ns, to)?;
        stream.set_write_timeout(Some(Duration::from_millis(100)))?;
        let local_port = stream.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || body(stream, &s, &n));
        Ok(Self {
            local_port,
            stop,
            sent,
            thread: Some(thread),
        })
    }

    pub fn start(ns: &str, to: SocketAddr, rate: Option<u64>, chunk: usize) -> Result<Self> {
        Self::spawn(ns, to, move |mut stream, stop, n| {
            let buf = vec![0x5au8; chunk];
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rate {
                    // Next write is due when the bytes so far have had their time at `rate`.
                    let due = Duration::from_secs_f64(n.load(Ordering::Relaxed) as f64 / r as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait.min(Duration::from_millis(100)));
                        continue;
                    }
                }
                if write_some(&mut stream, &buf, n).is_none() {
                    return;
                }
            }
        })
    }

    /// A sender whose rate (bytes/s) can change while it runs: a token bucket refilled at the
    /// current value of `rate` (0 pauses it), holding at most 100 ms of credit.
    pub fn start_variable(
        ns: &str,
        to: SocketAddr,
        rate: Arc<AtomicU64>,
        chunk: usize,
    ) -> Result<Self> {
        Self::spawn(ns, to, move |mut stream, stop, n| {
            let buf = vec![0x5au8; chunk];
            let (mut credit, mut last) = (0.0f64, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                let r = rate.load(Ordering::Relaxed) as f64;
                let now = Instant::now();
                credit = (credit + r * (now - last).as_secs_f64()).min((r * 0.1).max(chunk as f64));
                last = now;
                if credit < chunk as f64 {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                match write_some(&mut stream, &buf, n) {
                    Some(w) => credit -= w as f64,
                    None => return,
                }
            }
        })
    }

    /// A user that submits whole requests (an upload each, like a long prompt) with Poisson
    /// arrivals: exponential gaps whose mean makes the offered load the current value of `rate`
    /// (bytes/s; 0 pauses it), sizes exponential around `mean_request` bytes (clipped to 1/16–8×).
    /// Open loop: a request due while the previous one is still being written is written right
    /// after it, so a congested link backs requests up in the socket, as it does for real clients.
    pub fn start_requests(
        ns: &str,
        to: SocketAddr,
        rate: Arc<AtomicU64>,
        mean_request: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::spawn(ns, to, move |mut stream, stop, n| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mean = mean_request.max(1) as f64;
            let exp = |rng: &mut fastrand::Rng| -(1.0f64 - rng.f64()).ln();
            let buf = vec![0x5au8; 64 * 1024];
            let mut due = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let r = rate.load(Ordering::Relaxed) as f64;
                if r <= 0.0 {
                    std::thread::sleep(Duration::from_millis(20));
                    due = Instant::now();
                    continue;
                }
                due += Duration::from_secs_f64(exp(&mut rng) * mean / r);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    // A long gap is slept in steps, so that a stop or a new rate is seen
                    // promptly; the gaps are memoryless, so the next one is drawn afresh.
                    if wait > Duration::from_millis(100) {
                        std::thread::sleep(Duration::from_millis(100));
                        due = Instant::now();
                        continue;
                    }
                    std::thread::sleep(wait);
                }
                let mut left = (exp(&mut rng) * mean).clamp(mean / 16.0, mean * 8.0) as usize;
                while left > 0 && !stop.load(Ordering::Relaxed) {
                    match write_some(&mut stream, &buf[..left.min(buf.len())], n) {
                        Some(w) => left -= w,
                        None => return,
                    }
                }
            }
        })
    }
}

/// One write, counted into `n`: what it wrote (0 when the socket was full for the write
/// timeout), or `None` once the connection failed.
fn write_some(stream: &mut TcpStream, buf: &[u8], n: &AtomicU64) -> Option<usize> {
    match stream.write(buf) {
        Ok(w) => {
            n.fetch_add(w as u64, Ordering::Relaxed);
            Some(w)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Some(0),
        Err(_) => None,
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the peer has acknowledged everything written on `stream` (TIOCOUTQ reaches 0).
pub fn wait_acked(stream: &TcpStream, timeout: Duration) -> Result<()> {
    use std::os::fd::AsRawFd;
    let t0 = Instant::now();
    loop {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the pointer.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        anyhow::ensure!(rc == 0, "ioctl TIOCOUTQ failed");
        if n == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < timeout,
            "{n} bytes still unacknowledged after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The innocent neighbour: a small request/response flow that measures the round trip it sees.
/// Every `every` the client writes a 16-byte message (sequence number, padding); the server in the
/// other namespace echoes it; the round trip is timed from the write to the echo's arrival.
pub struct EchoProbe {
    stop: Arc<AtomicBool>,
    samples: Arc<std::sync::Mutex<Vec<(f64, f64)>>>,
    started: Instant,
    threads: Vec<JoinHandle<()>>,
}

const ECHO_LEN: usize = 16;

impl EchoProbe {
    /// Starts the echo server at `addr` in `server_ns` and the prober in `client_ns`.
    pub fn start(
        client_ns: &str,
        server_ns: &str,
        addr: SocketAddr,
        every: Duration,
    ) -> Result<Self> {
        let listener = in_netns(server_ns, move || TcpListener::bind(addr).context("bind"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else {
                return;
            };
            let _ = c.set_nodelay(true);
            let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; ECHO_LEN];
            while !s.load(Ordering::Relaxed) {
                match c.read_exact(&mut buf) {
                    Ok(()) => {
                        if c.write_all(&buf).is_err() {
                            return;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        }));
        let stream = connect_from(client_ns, addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let started = Instant::now();
        let sent_at = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, at, mut w) = (stop.clone(), sent_at.clone(), stream.try_clone()?);
        threads.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let mut msg = [0u8; ECHO_LEN];
                msg[..8].copy_from_slice(&seq.to_le_bytes());
                at.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
                if w.write_all(&msg).is_err() {
                    return;
                }
                seq += 1;
                next += every;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }));
        let (s, out, mut r) = (stop.clone(), samples.clone(), stream);
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; ECHO_LEN];
            while !s.load(Ordering::Relaxed) {
                match r.read_exact(&mut buf) {
                    Ok(()) => {
                        let now = Instant::now();
                        let mut b8 = [0u8; 8];
                        b8.copy_from_slice(&buf[..8]);
                        let seq = u64::from_le_bytes(b8) as usize;
                        let t = sent_at
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(seq)
                            .copied();
                        if let Some(t) = t {
                            out.lock().unwrap_or_else(|p| p.into_inner()).push((
                                (t - started).as_secs_f64(),
                                (now - t).as_secs_f64() * 1000.0,
                            ));
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        }));
        Ok(Self {
            stop,
            samples,
            started,
            threads,
        })
    }

    /// When the probe started (sample times are seconds since then).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Samples so far: (seconds since start at the write, round trip in ms).
    pub fn samples(&self) -> Vec<(f64, f64)> {
        self.samples_since(f64::NEG_INFINITY)
    }

    /// The samples written at `from` (seconds since start) or later: a copy of the recent tail
    /// without copying the whole history. Replies come back over one connection in the order the
    /// probes were written, so the samples are sorted by write time.
    pub fn samples_since(&self, from: f64) -> Vec<(f64, f64)> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let first = s.partition_point(|x| x.0 < from);
        s[first..].to_vec()
    }
}

impl Drop for EchoProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
