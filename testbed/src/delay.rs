//! A fixed-delay line for the router. This kernel has neither `netem` nor `fq` (so no EDT delay), so
//! client→server packets are policy-routed into a TUN device; a reader thread timestamps each packet and
//! a writer thread hands it back to the kernel when its delay has passed, which forwards it on. Packets
//! keep their order; a full queue drops, as a router's would.

use std::{
    io::{ErrorKind, Read, Write},
    os::fd::{AsRawFd, BorrowedFd},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::{ROUTER_TO_CLIENT, in_netns, run};

const TUN_NAME: &str = "tfdelay";
const TABLE: &str = "100";
/// Packets the line holds at most (about 1.4 GB/s × 100 ms would need more; test traffic is far below).
const QUEUE_PACKETS: usize = 65_536;

pub struct DelayLine {
    stop: Arc<AtomicBool>,
    /// One-way delay, µs: read for each packet as it enters, so a change applies from the next.
    delay_us: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    /// Packets delivered after their delay.
    pub forwarded: Arc<AtomicU64>,
    /// Packets dropped because the line was full.
    pub dropped: Arc<AtomicU64>,
}

impl DelayLine {
    /// Starts delaying every packet that enters `router_ns` from the client by `delay`.
    pub fn start(router_ns: &str, delay: Duration) -> Result<Self> {
        let dev = in_netns(router_ns, || {
            let mut cfg = tun::Configuration::default();
            cfg.tun_name(TUN_NAME).up();
            tun::create(&cfg).context("creating the TUN delay device (is /dev/net/tun there?)")
        })?;
        dev.set_nonblock().context("TUN non-blocking")?;
        let ns =
            |args: &[&str]| run(Command::new("ip").args(["-n", router_ns]).args(args)).map(|_| ());
        // Replace any rule left by an earlier line in this namespace.
        let _ = ns(&["rule", "del", "iif", ROUTER_TO_CLIENT, "lookup", TABLE]);
        ns(&[
            "route", "replace", "default", "dev", TUN_NAME, "table", TABLE,
        ])?;
        ns(&[
            "rule",
            "add",
            "iif",
            ROUTER_TO_CLIENT,
            "lookup",
            TABLE,
            "pref",
            "100",
        ])?;
        for key in ["all", "default", TUN_NAME] {
            run(Command::new("ip")
                .args(["netns", "exec", router_ns, "sysctl", "-q", "-w"])
                .arg(format!("net.ipv4.conf.{key}.rp_filter=0")))?;
        }

        let (reader, writer) = dev.split();
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let delay_us = Arc::new(AtomicU64::new(delay.as_micros() as u64));
        let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE_PACKETS);
        let threads = vec![
            {
                let (stop, dropped, delay) = (stop.clone(), dropped.clone(), delay_us.clone());
                thread::Builder::new()
                    .name("delay-in".into())
                    .spawn(move || read_loop(reader, tx, &delay, &stop, &dropped))?
            },
            {
                let (stop, forwarded) = (stop.clone(), forwarded.clone());
                thread::Builder::new()
                    .name("delay-out".into())
                    .spawn(move || write_loop(writer, rx, &stop, &forwarded))?
            },
        ];
        Ok(Self {
            stop,
            delay_us,
            threads,
            forwarded,
            dropped,
        })
    }

    /// Changes the delay of the packets that enter from now on; those already in the line keep
    /// theirs and their order (a path that lengthens or shortens, without the loss and the TUN
    /// device's churn of replacing the line).
    pub fn set(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }
}

fn read_loop(
    mut reader: impl Read + AsRawFd,
    tx: SyncSender<(Instant, Vec<u8>)>,
    delay: &AtomicU64,
    stop: &AtomicBool,
    dropped: &AtomicU64,
) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the fd stays open for as long as `reader` lives, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(reader.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
                    match tx.try_send((due, buf[..n].to_vec())) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

fn write_loop(
    mut writer: impl Write,
    rx: Receiver<(Instant, Vec<u8>)>,
    stop: &AtomicBool,
    forwarded: &AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        let (due, pkt) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(p) => p,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        // A full TUN queue is a drop, like any router's.
        if writer.write(&pkt).is_ok() {
            forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
