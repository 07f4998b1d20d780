//! The demo's scenarios: what load each client offers, over which link, against which backend.
//! The workload is the same for every arm; only the pacing differs.

use std::time::Duration;

use serde::Serialize;

/// The arms, in the order they are interleaved within each repeat.
pub const ARMS: &[&str] = &["off", "pid", "sigmoid", "gradient2", "aimd"];

/// An arm named on the command line: one of [`ARMS`], or `pid@MS` — `pid` with its own setpoint
/// (p95 RTT, ms), a point on its p99-vs-throughput frontier.
pub fn parse_arm(s: &str) -> Result<String, String> {
    if ARMS.contains(&s) || arm_setpoint(s).is_some() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not an arm: one of {} or pid@MS (pid with a setpoint of MS ms, e.g. pid@30)",
            ARMS.join(", ")
        ))
    }
}

/// The controller an arm asks the hint server for.
pub fn arm_controller(arm: &str) -> &str {
    arm.split_once('@').map_or(arm, |(c, _)| c)
}

/// The setpoint of a `pid@MS` arm (None for every other arm: they use the demo's setpoint).
pub fn arm_setpoint(arm: &str) -> Option<f64> {
    let (c, ms) = arm.split_once('@')?;
    let ms: f64 = ms.parse().ok()?;
    (c == "pid" && ms.is_finite() && ms > 0.0).then_some(ms)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Batch,
    Interactive,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Batch => "batch",
            Role::Interactive => "interactive",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ClientSpec {
    pub role: Role,
    /// Closed loop with this many users …
    pub users: Option<u32>,
    /// … or open loop at this multiple of the backend's measured capacity.
    pub open_loop_x_capacity: Option<f64>,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
    pub truncate_prompt_tokens: Option<u32>,
    /// Highest rate the hint server may grant this client.
    pub max_rps: f64,
    /// What one of its requests costs the scenario's bottleneck, relative to a batch request
    /// (the hint server's `request_cost`): over a network bottleneck, its bytes on the wire. A
    /// group's allowed load is shared in these units, so the interactive client's reserve of small
    /// prompts is not counted as if each were a 100 KB upload.
    pub request_cost: f64,
    pub max_concurrency: u32,
    /// TTFT objective for goodput, ms; infinite for batch clients, whose goodput is every
    /// completed request.
    pub slo_ttft_ms: f64,
    /// Sends to the server's second address, so its flows can be told apart.
    pub second_address: bool,
    /// The pacer's `--max-wait`: a request still waiting at its gate this long after submission
    /// is shed (its user has given up), the same for every arm.
    pub max_wait_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub what: &'static str,
    pub rate_kbit: u64,
    pub buffer_ms: u64,
    /// Bottleneck changes: (fraction of the run, kbit/s).
    pub steps: Vec<(f64, u64)>,
    pub max_running: u32,
    pub max_waiting: u32,
    pub clients: Vec<ClientSpec>,
    #[serde(with = "humantime_serde_secs")]
    pub duration: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub warmup: Duration,
    /// Further `pid@MS` arms the full run adds here: points on `pid`'s p99-vs-throughput
    /// frontier, so it can be compared with a baseline at that baseline's throughput.
    pub frontier: Vec<&'static str>,
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

pub const NAMES: &[&str] = &[
    "network-bound",
    "compute-bound",
    "open-loop",
    "bandwidth-step",
];

/// The batch users' upload and the interactive users' prompt, bytes.
const UPLOAD_BYTES: usize = 100_000;
const CHAT_BYTES: usize = 400;
/// An interactive prompt beside a batch upload on the wire.
const UPLOAD_SHARE: f64 = CHAT_BYTES as f64 / UPLOAD_BYTES as f64;

fn batch_uploads(users: u32) -> ClientSpec {
    ClientSpec {
        role: Role::Batch,
        users: Some(users),
        open_loop_x_capacity: None,
        // A retrieval-sized context: the upload loads the link; the model keeps its last 64 tokens.
        prompt_bytes: UPLOAD_BYTES,
        max_tokens: 4,
        truncate_prompt_tokens: Some(64),
        max_rps: 100.0,
        request_cost: 1.0,
        max_concurrency: users,
        slo_ttft_ms: f64::INFINITY,
        second_address: false,
        max_wait_ms: None,
    }
}

/// `request_cost`: one interactive request's cost relative to the scenario's batch request.
fn interactive(users: u32, slo_ttft_ms: f64, request_cost: f64) -> ClientSpec {
    ClientSpec {
        role: Role::Interactive,
        users: Some(users),
        open_loop_x_capacity: None,
        prompt_bytes: CHAT_BYTES,
        max_tokens: 32,
        truncate_prompt_tokens: None,
        // About what two users of 32-token answers ask for: strict priority reserves it first.
        max_rps: 10.0,
        request_cost,
        max_concurrency: users,
        slo_ttft_ms,
        second_address: true,
        max_wait_ms: None,
    }
}

/// The scenario `name` with runs of `duration` (the bandwidth step: `step_duration`).
pub fn scenario(
    name: &str,
    duration: Duration,
    step_duration: Duration,
    warmup: Duration,
    rate_kbit: u64,
) -> Option<Scenario> {
    let s = match name {
        "network-bound" => Scenario {
            name: "network-bound",
            what: "32 users upload 100 KB contexts over the bottleneck beside 2 interactive streaming users and the probe",
            rate_kbit,
            buffer_ms: 300,
            steps: vec![],
            max_running: 16,
            max_waiting: 256,
            clients: vec![batch_uploads(32), interactive(2, 500.0, UPLOAD_SHARE)],
            duration,
            warmup,
            // 1.5× the idle round trip (10 ms): 5 ms of queue. Chosen from test-bed trials at
            // 8069ef8 (3 repeats each beside gradient2 at 19.1 req/s, 43 ms): pid@15 24 ms at
            // 23.0 req/s, pid@25 51 ms at 22.9, pid@20 94 ms at 22.8 over 2 (a probe past the
            // fit in one). Before 8069ef8 the bursts of a low setpoint's first window ended
            // startup at a quarter of the link (pid@15 at 10.1 req/s in one repeat). In the full
            // run at 56ca5d8 one pid@15 repeat took the empty windows at its fit for a widened path
            // and restarted its search by doubling (238 ms): a fragility of pid this near the floor.
            frontier: vec!["pid@15"],
        },
        "compute-bound" => Scenario {
            name: "compute-bound",
            what: "24 batch users (3× the backend's 8 running slots) beside 2 interactive users with a 500 ms TTFT SLO",
            rate_kbit: rate_kbit * 5,
            buffer_ms: 300,
            steps: vec![],
            max_running: 8,
            max_waiting: 256,
            clients: vec![
                ClientSpec {
                    role: Role::Batch,
                    users: Some(24),
                    open_loop_x_capacity: None,
                    prompt_bytes: 400,
                    max_tokens: 32,
                    truncate_prompt_tokens: None,
                    max_rps: 100.0,
                    request_cost: 1.0,
                    max_concurrency: 24,
                    slo_ttft_ms: f64::INFINITY,
                    second_address: false,
                    max_wait_ms: None,
                },
                // The same prompts and answers as the batch users': the same cost to the backend.
                interactive(2, 500.0, 1.0),
            ],
            duration,
            warmup,
            frontier: vec![],
        },
        "open-loop" => Scenario {
            name: "open-loop",
            what: "Poisson arrivals at 1.5× the backend's measured capacity; goodput = answers whose TTFT met 1 s; a request still waiting in the pacer 500 ms after submission is shed",
            rate_kbit: rate_kbit * 5,
            buffer_ms: 300,
            steps: vec![],
            max_running: 8,
            max_waiting: 512,
            clients: vec![ClientSpec {
                role: Role::Batch,
                users: None,
                open_loop_x_capacity: Some(1.5),
                prompt_bytes: 400,
                max_tokens: 32,
                truncate_prompt_tokens: None,
                max_rps: 100.0,
                request_cost: 1.0,
                max_concurrency: 64,
                slo_ttft_ms: 1_000.0,
                second_address: false,
                // Half the TTFT objective: a request that waited longer rarely meets it.
                max_wait_ms: Some(500),
            }],
            duration,
            warmup,
            frontier: vec![],
        },
        "bandwidth-step" => Scenario {
            name: "bandwidth-step",
            what: "network-bound load while the bottleneck steps 20 → 5 → 20 Mbit/s at a third and two thirds of the run",
            rate_kbit,
            buffer_ms: 300,
            steps: vec![(1.0 / 3.0, rate_kbit / 4), (2.0 / 3.0, rate_kbit)],
            max_running: 16,
            max_waiting: 256,
            clients: vec![batch_uploads(32), interactive(2, 500.0, UPLOAD_SHARE)],
            duration: step_duration,
            warmup,
            frontier: vec![],
        },
        _ => return None,
    };
    Some(s)
}
