//! The pacing gate: a token bucket and a concurrency limit, both changeable while requests wait,
//! served first come, first served. A request waits in one FIFO queue for both a token and a free
//! slot; nobody can overtake, so pacing never makes one user wait longer so that another, who
//! arrived later, can go first.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, oneshot};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Requests per second; `f64::INFINITY` = unpaced.
    pub rate: f64,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl Limit {
    pub const UNLIMITED: Limit = Limit {
        rate: f64::INFINITY,
        concurrency: usize::MAX,
    };
}

struct State {
    limit: Limit,
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
    queue: VecDeque<oneshot::Sender<()>>,
}

/// Bucket depth: one request (smooth pacing; no bursts after an idle spell).
const BURST: f64 = 1.0;

pub struct Gate {
    st: Mutex<State>,
    wake: Arc<Notify>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        // Lets the dispatcher see that the gate is gone and end.
        self.wake.notify_one();
    }
}

/// A granted slot; dropping it frees the slot.
pub struct Permit {
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut s) = self.gate.st.lock() {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        self.gate.wake.notify_one();
    }
}

impl Gate {
    pub fn new(limit: Limit) -> Arc<Self> {
        let wake = Arc::new(Notify::new());
        let g = Arc::new(Self {
            st: Mutex::new(State {
                limit,
                tokens: BURST,
                refilled: Instant::now(),
                in_flight: 0,
                queue: VecDeque::new(),
            }),
            wake: wake.clone(),
        });
        tokio::spawn(dispatch(Arc::downgrade(&g), wake));
        g
    }

    pub fn set(&self, limit: Limit) {
        if let Ok(mut s) = self.st.lock() {
            refill(&mut s);
            s.limit = limit;
        }
        self.wake.notify_one();
    }

    pub fn limit(&self) -> Limit {
        self.st.lock().map(|s| s.limit).unwrap_or(Limit {
            rate: 0.0,
            concurrency: 0,
        })
    }

    /// Requests waiting for a grant (not those that gave up).
    pub fn waiting(&self) -> usize {
        self.st
            .lock()
            .map(|s| s.queue.iter().filter(|tx| !tx.is_closed()).count())
            .unwrap_or(0)
    }

    /// Waits for a token and a slot, in arrival order.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        match self.enqueue() {
            Ok(p) => p,
            Err(rx) => {
                let _ = rx.await;
                Permit { gate: self.clone() }
            }
        }
    }

    /// As [`Gate::acquire`], but gives up at `deadline`: `None` when no slot was granted by then.
    /// The request leaves the queue without taking a token or a slot; a grant that races the
    /// deadline is kept, never lost.
    pub async fn acquire_until(self: &Arc<Self>, deadline: Instant) -> Option<Permit> {
        let mut rx = match self.enqueue() {
            Ok(p) => return Some(p),
            Err(rx) => rx,
        };
        if tokio::time::timeout_at(deadline.into(), &mut rx)
            .await
            .is_ok()
        {
            return Some(Permit { gate: self.clone() });
        }
        // No grant can arrive after this; one that arrived before it is ours.
        rx.close();
        rx.try_recv().ok().map(|()| Permit { gate: self.clone() })
    }

    /// Takes a slot at once when nobody waits ahead and a token and a slot are free; otherwise
    /// joins the queue and returns what the dispatcher will signal.
    fn enqueue(self: &Arc<Self>) -> Result<Permit, oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut s) = self.st.lock() {
            refill(&mut s);
            while s.queue.front().is_some_and(|tx| tx.is_closed()) {
                s.queue.pop_front();
            }
            if s.queue.is_empty()
                && s.in_flight < s.limit.concurrency
                && (!s.limit.rate.is_finite() || s.tokens >= 1.0)
            {
                if s.limit.rate.is_finite() {
                    s.tokens -= 1.0;
                }
                s.in_flight += 1;
                return Ok(Permit { gate: self.clone() });
            }
            s.queue.push_back(tx);
        }
        self.wake.notify_one();
        Err(rx)
    }

    /// Requests in flight (granted and not yet released).
    pub fn in_flight(&self) -> usize {
        self.st.lock().map(|s| s.in_flight).unwrap_or(0)
    }
}

fn refill(s: &mut State) {
    let now = Instant::now();
    if s.limit.rate.is_finite() {
        s.tokens = (s.tokens + s.limit.rate * (now - s.refilled).as_secs_f64()).min(BURST);
    } else {
        s.tokens = BURST;
    }
    s.refilled = now;
}

async fn dispatch(g: std::sync::Weak<Gate>, wake: Arc<Notify>) {
    loop {
        let Some(gate) = g.upgrade() else { return };
        let mut sleep_for: Option<Duration> = None;
        if let Ok(mut s) = gate.st.lock() {
            refill(&mut s);
            loop {
                // Requests that gave up (deadline, run over) leave from the front without a token.
                while s.queue.front().is_some_and(|tx| tx.is_closed()) {
                    s.queue.pop_front();
                }
                if s.queue.is_empty() || s.in_flight >= s.limit.concurrency {
                    break;
                }
                if s.limit.rate.is_finite() && s.tokens < 1.0 {
                    let rate = s.limit.rate.max(1e-6);
                    sleep_for = Some(Duration::from_secs_f64(((1.0 - s.tokens) / rate).min(1.0)));
                    break;
                }
                let Some(tx) = s.queue.pop_front() else { break };
                if tx.send(()).is_ok() {
                    if s.limit.rate.is_finite() {
                        s.tokens -= 1.0;
                    }
                    s.in_flight += 1;
                }
            }
        }
        drop(gate);
        let notified = wake.notified();
        match sleep_for {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Microseconds of the pacer's own work per request: (uncontended: a free slot, nobody waiting;
/// queued: 64 tasks contend for one slot, so every grant goes through the FIFO and the dispatcher).
pub async fn bench(n: usize) -> (f64, f64) {
    let g = Gate::new(Limit::UNLIMITED);
    let t0 = Instant::now();
    for _ in 0..n {
        let p = g.acquire().await;
        drop(p);
    }
    let free = t0.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    let g = Gate::new(Limit {
        rate: f64::INFINITY,
        concurrency: 1,
    });
    let t0 = Instant::now();
    let per = n / 64;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    let p = g.acquire().await;
                    // Hold the slot across a yield, so that the others queue behind it.
                    tokio::task::yield_now().await;
                    drop(p);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let queued = t0.elapsed().as_secs_f64() * 1e6 / (per * 64).max(1) as f64;
    (free, queued)
}
