use super::{sim::*, *};
use proptest::prelude::*;
use tokenflow_schema::ControllerKind;

fn limits() -> Limits {
    Limits {
        setpoint_ms: 50.0,
        min_rps: 0.5,
        max_rps: 50.0,
        max_concurrency: 64,
    }
}

/// Mean figures of each controller over several seeds of the default plant (20 → 5 → 20 Mbit/s).
fn mean_figures(kind: ControllerKind) -> (f64, f64, f64) {
    mean_figures_with(kind, || Governor::new(kind, limits()))
}

/// [`mean_figures`] of the governor `make` builds (a controller with its own gains).
fn mean_figures_with(kind: ControllerKind, make: impl Fn() -> Governor) -> (f64, f64, f64) {
    let plant = Plant::default();
    let (mut band, mut mape, mut util) = (0.0, 0.0, 0.0);
    let seeds = 8;
    for seed in 0..seeds {
        let f = figures(kind, &plant, 50.0, &simulate_with(make(), &plant, seed));
        band += f.steady_in_band;
        mape += f.steady_mape;
        util += f.steady_utilisation;
    }
    let n = seeds as f64;
    (band / n, mape / n, util / n)
}

#[test]
fn pid_holds_the_setpoint_better_than_every_baseline() {
    let (pid_band, pid_mape, pid_util) = mean_figures(ControllerKind::Pid);
    println!("pid: in band {pid_band:.2}, mape {pid_mape:.2}, utilisation {pid_util:.2}");
    for kind in [
        ControllerKind::Sigmoid,
        ControllerKind::Gradient2,
        ControllerKind::Aimd,
    ] {
        let (band, mape, util) = mean_figures(kind);
        println!(
            "{}: in band {band:.2}, mape {mape:.2}, utilisation {util:.2}",
            kind.as_str()
        );
        assert!(
            pid_mape < mape,
            "{} tracks the setpoint better: {mape} vs {pid_mape}",
            kind.as_str()
        );
        assert!(
            pid_band > band,
            "{} stays in band more: {band} vs {pid_band}",
            kind.as_str()
        );
    }
    // Holding the queue at the setpoint keeps the link busy.
    assert!(pid_util > 0.85, "utilisation {pid_util}");
}

#[test]
fn a_standing_queue_is_tracked_within_the_band() {
    use super::pid::{Pid, PidGains};
    // The same controller with and without the tracking law, on the 20 → 5 → 20 Mbit/s plant:
    // a bottleneck queue integrates the rate's excess over the link, and a PID on the p95 alone
    // swings around the link's rate (about 60 % of steady periods in the band).
    let band = |g: PidGains| {
        mean_figures_with(ControllerKind::Pid, || {
            Governor::with_controller(AnyController::Pid(Pid::new(g, &limits())), limits())
        })
        .0
    };
    let tracking = band(PidGains::default());
    let pid_alone = band(PidGains {
        track_horizon: 0.0,
        ..PidGains::default()
    });
    println!("in band: tracking {tracking:.2}, the PID alone {pid_alone:.2}");
    assert!(
        tracking >= 0.9,
        "tracking: {tracking:.2} of steady periods in the band"
    );
    assert!(
        tracking > pid_alone + 0.1,
        "{tracking:.2} vs {pid_alone:.2}"
    );
}

#[test]
fn pid_cuts_within_a_few_periods_after_capacity_drops() {
    let plant = Plant::default();
    let run = simulate(ControllerKind::Pid, &plant, limits(), 3);
    // After 20 → 5 Mbit/s at t = 40 s, the buffer fills; the rate must come below the new
    // capacity within 6 periods and the queue must drain below twice the setpoint within 8.
    let after: Vec<&Period> = run.iter().filter(|p| p.t > 40.0).collect();
    let below = after
        .iter()
        .position(|p| p.rate_rps < p.capacity_rps)
        .unwrap_or(usize::MAX);
    assert!(
        below <= 6,
        "rate still above capacity after {below} periods"
    );
    let drained = after
        .iter()
        .position(|p| p.p95_ms < 100.0)
        .unwrap_or(usize::MAX);
    assert!(drained <= 8, "queue drained after {drained} periods");
}

#[test]
fn sigmoid_is_the_original_mapping() {
    // rtt 0 → health 1 → 5 + 95/(1+e^-2.5)
    let top = 5.0 + 95.0 / (1.0 + (-2.5f64).exp());
    assert!((Sigmoid::rate(0.0, 0.0) - top).abs() < 1e-9);
    // rtt 50 ms → factor 0.5 → health 0.5 → 5 + 47.5
    assert!((Sigmoid::rate(50_000.0, 0.0) - 52.5).abs() < 1e-9);
    // anomaly pushes health to the 0.01 floor
    let floor = 5.0 + 95.0 / (1.0 + (-5.0f64 * (0.01 - 0.5)).exp());
    assert!((Sigmoid::rate(50_000.0, 1.0) - floor).abs() < 1e-9);
}

#[test]
fn stale_input_is_conservative_and_marked() {
    for kind in [
        ControllerKind::Pid,
        ControllerKind::Sigmoid,
        ControllerKind::Gradient2,
        ControllerKind::Aimd,
    ] {
        let mut g = Governor::new(kind, limits());
        for k in 0..30 {
            g.update(&Observation {
                now: k as f64,
                p95_rtt_ms: Some(25.0),
                p50_rtt_ms: None,
                delivered_mbit_s: None,
                ..Default::default()
            });
        }
        let before = g.last_rps();
        let d = g.update(&Observation {
            now: 31.0,
            stale: true,
            ..Default::default()
        });
        assert!(d.stale);
        assert!(
            d.rate_rps <= before + 1e-9 && d.rate_rps <= limits().max_rps * 0.1 + 1e-9,
            "{kind:?}: {d:?}"
        );
        assert_eq!(d.health, 0.0);
    }
}

fn kind_strategy() -> impl Strategy<Value = ControllerKind> {
    prop_oneof![
        Just(ControllerKind::Pid),
        Just(ControllerKind::Sigmoid),
        Just(ControllerKind::Gradient2),
        Just(ControllerKind::Aimd),
        Just(ControllerKind::Off),
    ]
}

proptest! {
    #[test]
    fn rates_stay_within_limits_for_any_input(
        kind in kind_strategy(),
        steps in proptest::collection::vec(
            (proptest::option::of(0.0f64..5000.0), proptest::option::of(0.0f64..5000.0), 0.0f64..1.0, any::<bool>(), 0.01f64..5.0,
             proptest::option::of(0.0f64..100.0), prop_oneof![Just(0.0f64), 0.0f64..500.0]),
            1..80,
        ),
        max in 1.0f64..500.0,
    ) {
        let l = Limits { setpoint_ms: 50.0, min_rps: 0.5f64.min(max), max_rps: max, max_concurrency: 32 };
        let mut g = Governor::new(kind, l);
        let mut now = 0.0;
        let mut last = g.last_rps();
        // What the link delivered and its retransmits too: the fits, the drain and its refit.
        for (rtt, pred, anomaly, stale, dt, delivered_mbit_s, retransmits_per_s) in steps {
            now += dt;
            let d = g.update(&Observation { now, p95_rtt_ms: rtt, p50_rtt_ms: rtt.map(|r| r * 0.6), mean_rtt_ms: rtt.map(|r| r * 0.7),
        delivered_mbit_s, predicted_p95_ms: pred, anomaly, inflight: None, retransmits_per_s, backend_queued: false, stale });
            prop_assert!(d.rate_rps.is_finite() && d.rate_rps >= 0.0);
            prop_assert!(d.rate_rps >= l.min_rps - 1e-9 && d.rate_rps <= l.max_rps + 1e-9);
            prop_assert!(d.max_concurrency >= 1 && d.max_concurrency <= l.max_concurrency);
            prop_assert!((0.0..=1.0).contains(&d.health));
            if stale && kind != ControllerKind::Off {
                prop_assert!(d.stale);
                prop_assert!(d.rate_rps <= last + 1e-9, "stale hint more generous than the last: {} > {last}", d.rate_rps);
            }
            last = d.rate_rps;
        }
    }
}

#[test]
#[ignore = "prints the simulated figures of every controller; run with --ignored --nocapture"]
fn print_sim_figures() {
    for kind in [
        ControllerKind::Pid,
        ControllerKind::Sigmoid,
        ControllerKind::Gradient2,
        ControllerKind::Aimd,
    ] {
        let plant = Plant::default();
        let f = figures(kind, &plant, 50.0, &simulate(kind, &plant, limits(), 1));
        println!("{f:?}");
    }
}

#[test]
#[ignore = "prints a simulated PID trace; run with --ignored --nocapture"]
fn print_pid_trace() {
    let fluid = Plant {
        capacity_steps: vec![(0.0, 20.0)],
        duration_s: 40.0,
        ..Plant::default()
    };
    let mbit: f64 = std::env::var("PLANT_MBIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20.0);
    let bed = Plant {
        capacity_steps: vec![(0.0, mbit)],
        ..Plant::test_bed()
    };
    for (name, plant) in [("fluid", fluid), ("bursty test bed", bed)] {
        println!("{name} plant:");
        for p in &simulate(ControllerKind::Pid, &plant, limits(), 1) {
            println!(
                "t {:5.0} cap {:5.1} rate {:5.1} delivered {:5.1} p95 {:6.1}",
                p.t, p.capacity_rps, p.rate_rps, p.delivered_rps, p.p95_ms
            );
        }
    }
}

#[test]
fn a_lasting_anomaly_damps_the_rate_without_ratcheting_it_down() {
    use super::pid::{Pid, PidGains};
    let l = limits();
    let mut pid = Pid::new(PidGains::default(), &l);
    let mut rates = Vec::new();
    for k in 0..30 {
        let obs = Observation {
            now: k as f64,
            // A standing queue just under the setpoint: no reason to cut.
            p95_rtt_ms: Some(45.0),
            p50_rtt_ms: None,
            mean_rtt_ms: None,
            delivered_mbit_s: None,
            predicted_p95_ms: Some(45.0),
            anomaly: 1.0,
            inflight: None,
            retransmits_per_s: 0.0,
            backend_queued: false,
            stale: false,
        };
        let (rate, _) = pid.update(&obs, &l);
        pid.applied(rate);
        rates.push(rate);
    }
    // Damped by at most `anomaly_damping` against the undamped rate, but never decaying.
    assert!(
        rates[29] >= rates[5] * 0.99,
        "the damping ratcheted the rate down: {rates:?}"
    );
}

#[test]
fn the_anomaly_score_damps_only_while_the_path_is_congested() {
    use super::pid::{Pid, PidGains};
    let l = limits();
    // Two groups side by side, one with the forest alarmed, one calm; returns both rates.
    let run = |p95: f64| {
        let mut rates = [0.0; 2];
        for (i, anomaly) in [1.0, 0.0].into_iter().enumerate() {
            let mut pid = Pid::new(PidGains::default(), &l);
            for k in 0..3 {
                let obs = Observation {
                    now: k as f64,
                    p95_rtt_ms: Some(p95),
                    p50_rtt_ms: None,
                    mean_rtt_ms: None,
                    delivered_mbit_s: None,
                    predicted_p95_ms: Some(p95),
                    anomaly,
                    inflight: None,
                    retransmits_per_s: 0.0,
                    backend_queued: false,
                    stale: false,
                };
                let (rate, _) = pid.update(&obs, &l);
                pid.applied(rate);
                rates[i] = rate;
            }
        }
        rates
    };
    // A fast path (p95 well under the setpoint): the score alone cuts nothing.
    let [alarmed, calm] = run(20.0);
    assert_eq!(alarmed, calm);
    // Nearing the setpoint, the score alone still cuts nothing.
    let [alarmed, calm] = run(45.0);
    assert_eq!(alarmed, calm);
    // Past the setpoint the score damps, more the further past: it ramps in over the overload
    // margin (a relay at the setpoint would swing the rate around it), all of it beyond.
    let ratio = |p95| {
        let [alarmed, calm] = run(p95);
        alarmed / calm
    };
    let (just, half, beyond) = (ratio(51.0), ratio(55.0), ratio(70.0));
    assert!(just > 0.95 && just < 1.0, "{just}");
    assert!(half < 0.9 && half > beyond, "{half} vs {beyond}");
    assert!((beyond - 0.7).abs() < 1e-9, "{beyond}");
}

#[test]
fn a_new_pid_group_reaches_the_path_capacity_within_a_few_periods() {
    // 20 Mbit/s throughout: 25 req/s of 100 KB. The group starts at a tenth of its maximum (5).
    let plant = Plant {
        capacity_steps: vec![(0.0, 20.0)],
        duration_s: 40.0,
        ..Plant::default()
    };
    for seed in 0..4 {
        let run = simulate(ControllerKind::Pid, &plant, limits(), seed);
        let reached = run
            .iter()
            .position(|p| p.delivered_rps >= 0.8 * p.capacity_rps)
            .unwrap_or(usize::MAX);
        assert!(
            reached <= 5,
            "seed {seed}: 80 % of capacity only after {reached} periods"
        );
        // Startup's overshoot is drained, and the loop then keeps the link busy.
        let late = &run[15..];
        let util = late
            .iter()
            .map(|p| (p.delivered_rps / p.capacity_rps).min(1.0))
            .sum::<f64>()
            / late.len() as f64;
        let mut p95s: Vec<f64> = late.iter().map(|p| p.p95_ms).collect();
        p95s.sort_by(f64::total_cmp);
        let median = p95s[p95s.len() / 2];
        assert!(util > 0.9, "seed {seed}: utilisation {util:.2}");
        assert!(
            median < 2.0 * 50.0,
            "seed {seed}: median p95 {median:.0} ms: startup's overshoot not drained"
        );
    }
}

#[test]
#[ignore = "tuning aid: mean simulated figures of PID variants; run with --ignored --nocapture"]
fn print_pid_variants() {
    use super::pid::{Pid, PidGains};
    let variants = [
        ("default", PidGains::default()),
        (
            "no tracking",
            PidGains {
                track_horizon: 0.0,
                ..PidGains::default()
            },
        ),
        (
            "track 0.5",
            PidGains {
                track_horizon: 0.5,
                ..PidGains::default()
            },
        ),
        (
            "track 1.0",
            PidGains {
                track_horizon: 1.0,
                ..PidGains::default()
            },
        ),
        (
            "no link-full hold",
            PidGains {
                link_full: 0.0,
                ..PidGains::default()
            },
        ),
        (
            "no startup",
            PidGains {
                startup_growth: 0.0,
                ..PidGains::default()
            },
        ),
        (
            "no overload margin",
            PidGains {
                overload_margin: 0.0,
                ..PidGains::default()
            },
        ),
        (
            "no hold",
            PidGains {
                hold_fraction: 0.0,
                ..PidGains::default()
            },
        ),
        (
            "hold 0.9, 10 periods, creep 4 %",
            PidGains {
                creep: 0.04,
                ..PidGains::default()
            },
        ),
        (
            "hold 0.95, 5 periods, creep 6 %",
            PidGains {
                hold_fraction: 0.95,
                hold_periods: 5,
                creep: 0.06,
                ..PidGains::default()
            },
        ),
        (
            "hold 0.9, 5 periods, creep 4 %",
            PidGains {
                hold_periods: 5,
                creep: 0.04,
                ..PidGains::default()
            },
        ),
        (
            "hold 0.95, 5 periods, creep 4 %",
            PidGains {
                hold_fraction: 0.95,
                hold_periods: 5,
                creep: 0.04,
                ..PidGains::default()
            },
        ),
    ];
    let fixed = Plant {
        capacity_steps: vec![(0.0, 20.0)],
        duration_s: 40.0,
        ..Plant::default()
    };
    let bed = Plant::test_bed();
    for (name, g) in variants {
        let (mut band, mut mape, mut util, mut start_util) = (0.0, 0.0, 0.0, 0.0);
        let (mut bed_util, mut bed_p95) = ([0.0; 4], 0.0);
        let seeds = 8;
        for seed in 0..seeds {
            let plant = Plant::default();
            let gov =
                Governor::with_controller(AnyController::Pid(Pid::new(g, &limits())), limits());
            let f = figures(
                ControllerKind::Pid,
                &plant,
                50.0,
                &simulate_with(gov, &plant, seed),
            );
            band += f.steady_in_band;
            mape += f.steady_mape;
            util += f.steady_utilisation;
            let gov =
                Governor::with_controller(AnyController::Pid(Pid::new(g, &limits())), limits());
            let run = simulate_with(gov, &fixed, seed);
            start_util += run[4..20]
                .iter()
                .map(|p| (p.delivered_rps / p.capacity_rps).min(1.0))
                .sum::<f64>()
                / 16.0;
            let gov =
                Governor::with_controller(AnyController::Pid(Pid::new(g, &limits())), limits());
            // Where the capacity falls on startup's doubling grid matters: vary it.
            let bed = Plant {
                capacity_steps: vec![(0.0, [14.0, 20.0, 26.0, 31.0][seed as usize % 4])],
                ..bed.clone()
            };
            let run = simulate_with(gov, &bed, seed);
            bed_util[seed as usize % 4] += run[4..20]
                .iter()
                .map(|p| (p.delivered_rps / p.capacity_rps).min(1.0))
                .sum::<f64>()
                / 16.0;
            let mut p95s: Vec<f64> = run[4..20].iter().map(|p| p.p95_ms).collect();
            p95s.sort_by(f64::total_cmp);
            bed_p95 += p95s[p95s.len() * 9 / 10];
        }
        let n = seeds as f64;
        println!(
            "{name}: band {:.2} mape {:.2} util {:.2} | fresh start, periods 4–20: utilisation {:.2}; \
             bursty test-bed plant at 14/20/26/31 Mbit/s: utilisation {:?}, p90 of p95 {:.0} ms",
            band / n,
            mape / n,
            util / n,
            start_util / n,
            bed_util.map(|u| (u / n * 4.0 * 100.0).round() / 100.0),
            bed_p95 / n
        );
    }
}

#[test]
fn startups_drain_grace_ends_with_its_queue() {
    use super::pid::{Pid, PidGains};
    let l = limits();
    let mut pid = Pid::new(PidGains::default(), &l);
    let mut step = |k: usize, p95: f64| pid_period(&mut pid, &l, k, p95);
    // Startup doubles, then its queue appears and drains without a further cut.
    step(0, 20.0);
    step(1, 20.0);
    let fallback = step(2, 120.0);
    assert!(
        step(3, 110.0) >= fallback * 0.999,
        "cut while startup's queue drained"
    );
    // The queue is gone; a new one later is cut, not excused as startup's.
    step(4, 20.0);
    let before = step(5, 25.0);
    let after = step(6, 200.0);
    assert!(
        after < before * 0.9,
        "a queue after the drain was not cut: {before} → {after}"
    );
}

#[test]
fn one_reading_a_bucket_over_the_setpoint_is_not_an_overload() {
    use super::pid::PidGains;
    let l = limits();
    let run = |g: PidGains| {
        let mut pid = without_startup(g, &l);
        let mut rate = 0.0;
        // 43.0 ms, then one 51.2 ms reading (the next bucket of the agent's histogram past
        // 50 ms), then 43.0 ms again for 6 periods.
        let series = [43.0, 43.0, 43.0, 51.2, 43.0, 43.0, 43.0, 43.0, 43.0, 43.0];
        let mut at_blip = 0.0;
        for (k, p95) in series.into_iter().enumerate() {
            rate = pid_period(&mut pid, &l, k, p95);
            if k == 3 {
                at_blip = rate;
            }
        }
        rate / at_blip
    };
    let with_margin = run(PidGains::default());
    let without = run(PidGains {
        overload_margin: 0.0,
        ..PidGains::default()
    });
    assert!(
        with_margin > 1.15,
        "rate grew only ×{with_margin:.2} in the 6 periods after the blip"
    );
    assert!(
        without < with_margin,
        "the margin made no difference (×{without:.2} vs ×{with_margin:.2})"
    );
}

/// A PID that starts in its normal loop (no startup doubling).
fn without_startup(g: super::pid::PidGains, l: &Limits) -> super::pid::Pid {
    super::pid::Pid::new(
        super::pid::PidGains {
            startup_growth: 0.0,
            ..g
        },
        l,
    )
}

/// One control period of a bare PID at second `k` with this p95 (forecast = the p95, no
/// anomaly); returns the rate applied.
fn pid_period(pid: &mut super::pid::Pid, l: &Limits, k: usize, p95: f64) -> f64 {
    observe(pid, l, k, p95, None, None)
}

/// One control period of a bare PID at second `k`: the window's p95 (also its forecast), median
/// and what the link delivered, when known, no anomaly; returns the rate applied.
fn observe(
    pid: &mut super::pid::Pid,
    l: &Limits,
    k: usize,
    p95: f64,
    p50_rtt_ms: Option<f64>,
    delivered_mbit_s: Option<f64>,
) -> f64 {
    observe_scored(pid, l, k, p95, p50_rtt_ms, delivered_mbit_s, 0.0)
}

/// [`observe`] with the Isolation Forest's score at `anomaly`.
fn observe_scored(
    pid: &mut super::pid::Pid,
    l: &Limits,
    k: usize,
    p95: f64,
    p50_rtt_ms: Option<f64>,
    delivered_mbit_s: Option<f64>,
    anomaly: f64,
) -> f64 {
    let obs = Observation {
        now: k as f64,
        p95_rtt_ms: Some(p95),
        p50_rtt_ms,
        delivered_mbit_s,
        predicted_p95_ms: Some(p95),
        anomaly,
        ..Observation::default()
    };
    let (rate, _) = pid.update(&obs, l);
    pid.applied(rate);
    rate
}

#[test]
fn below_the_setpoint_a_standing_queue_climbs_slower_than_bursts() {
    use super::pid::PidGains;
    let l = limits();
    // Ten periods at p95 40 ms (base 20 ms) after a settled start: once with the median beside
    // the p95 (a standing queue of 20 ms, close to the setpoint's 30), once with the median at
    // the base (bursts that drain between requests: no queue the rate holds).
    let climb = |p50: f64| {
        let mut pid = without_startup(PidGains::default(), &l);
        let mut rates = Vec::new();
        for k in 0..12 {
            let (p95, p50) = if k < 2 { (20.0, 20.0) } else { (40.0, p50) };
            let obs = Observation {
                now: k as f64,
                p95_rtt_ms: Some(p95),
                p50_rtt_ms: Some(p50),
                predicted_p95_ms: Some(p95),
                ..Observation::default()
            };
            let (rate, _) = pid.update(&obs, &l);
            pid.applied(rate);
            rates.push(rate);
        }
        rates[11] / rates[2]
    };
    let (standing, bursts) = (climb(39.0), climb(20.5));
    // 10 ms under the setpoint on a standing queue is a few per cent of rate in all: the queue
    // grows by the rate's excess every second.
    assert!(
        standing < 1.10,
        "a standing queue's rate grew ×{standing:.2}"
    );
    assert!(bursts > 1.5, "with bursts only the rate grew ×{bursts:.2}");
}

#[test]
fn on_a_quiet_link_pid_holds_the_band_after_each_step() {
    // 20 → 5 → 20 Mbit/s with no cross traffic: the controller's own step response.
    let quiet = Plant {
        cross_walk: 0.0,
        ..Plant::default()
    };
    for seed in 0..4 {
        let f = figures(
            ControllerKind::Pid,
            &quiet,
            50.0,
            &simulate(ControllerKind::Pid, &quiet, limits(), seed),
        );
        assert!(f.steady_in_band >= 0.95, "seed {seed}: {f:?}");
        assert!(f.overshoot <= 0.2, "seed {seed}: {f:?}");
        // Both steps settle within 5 control periods (the target): down by cutting to
        // the rate the narrowed link delivers less a period's drain, up by searching again as
        // startup does once the queue stays gone.
        assert!(
            f.settle_periods.iter().all(|s| s.is_some_and(|p| p <= 5)),
            "seed {seed}: {f:?}"
        );
    }
}

#[test]
fn when_the_link_widens_the_old_overload_rate_is_left_behind() {
    // After 5 → 20 Mbit/s at t = 100 s the memory of the rate that overloaded 5 Mbit/s must not
    // hold the climb to creeping: 80 % of the new capacity within 12 periods.
    let quiet = Plant {
        cross_walk: 0.0,
        ..Plant::default()
    };
    let run = simulate(ControllerKind::Pid, &quiet, limits(), 2);
    let after: Vec<&Period> = run.iter().filter(|p| p.t > 100.5).collect();
    let reached = after
        .iter()
        .position(|p| p.delivered_rps >= 0.8 * p.capacity_rps)
        .unwrap_or(usize::MAX);
    assert!(reached <= 12, "80 % of capacity after {reached} periods");
}

#[test]
fn a_full_link_holds_the_rate_where_the_rtt_cannot_tell() {
    use super::pid::PidGains;
    let l = limits();
    // Bursts: the p95 reads 38.9 ms (one histogram bucket) from half the link to past it and the
    // median stays at the base; the link delivers 0.8 Mbit/s per request/s up to 18 Mbit/s.
    let run = |g: PidGains| {
        let mut pid = without_startup(g, &l);
        // A new group starts at a tenth of its maximum.
        let mut rate: f64 = l.max_rps * 0.1;
        let mut rates = Vec::new();
        for k in 0..30 {
            let (p95, p50) = if k == 0 { (10.8, 10.8) } else { (38.9, 11.0) };
            let obs = Observation {
                now: k as f64,
                p95_rtt_ms: Some(p95),
                p50_rtt_ms: Some(p50),
                delivered_mbit_s: Some((rate * 0.8).min(18.0)),
                predicted_p95_ms: Some(p95),
                ..Observation::default()
            };
            let (r, _) = pid.update(&obs, &l);
            pid.applied(r);
            rate = r;
            rates.push(r);
        }
        rates
    };
    let held = run(PidGains::default());
    let capacity = 18.0 / 0.8;
    let past = held.iter().cloned().fold(0.0, f64::max);
    // The rate may pass the capacity by the step that showed the link full, and by a probe.
    assert!(
        past < capacity * 1.4,
        "the rate reached {past:.1} req/s (capacity {capacity})"
    );
    assert!(
        held[29] > capacity * 0.9,
        "the rate ended at {:.1} req/s",
        held[29]
    );
    let blind = run(PidGains {
        link_full: 0.0,
        ..PidGains::default()
    });
    assert!(
        blind[29] > held[29] * 1.3,
        "without the hold the rate ended at {:.1} req/s, with it {:.1}",
        blind[29],
        held[29]
    );
}

#[test]
fn gradient2_samples_the_windows_mean_rtt_as_concurrency_limits_does() {
    use super::{Controller, Gradient2};
    let l = limits();
    // Ten windows at the base RTT, then ten more: either bursts that lift the p95 threefold while
    // the mean stays near the base, or a standing queue (the mean itself more than doubled).
    let run = |phases: &[(f64, f64)]| {
        let mut g = Gradient2::new(&l);
        let mut rates = Vec::new();
        for (k, &(mean, p95)) in phases
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, 10))
            .enumerate()
        {
            let obs = Observation {
                now: k as f64,
                p95_rtt_ms: Some(p95),
                mean_rtt_ms: Some(mean),
                ..Observation::default()
            };
            let (rate, _) = g.update(&obs, &l);
            g.applied(rate);
            rates.push(rate);
        }
        rates
    };
    let bursts = run(&[(12.0, 14.0), (13.0, 40.0)]);
    assert!(bursts[19] > bursts[9], "bursts alone cut: {bursts:?}");
    let queue = run(&[(12.0, 14.0), (30.0, 40.0)]);
    assert!(
        queue[19] < queue[9],
        "a standing queue did not cut: {queue:?}"
    );
    // Without a mean the p95 is the sample.
    let mut g = Gradient2::new(&l);
    let obs = |p95| Observation {
        p95_rtt_ms: Some(p95),
        ..Observation::default()
    };
    for _ in 0..10 {
        let (r, _) = g.update(&obs(14.0), &l);
        g.applied(r);
    }
    let before = g.update(&obs(14.0), &l).0;
    g.applied(before);
    assert!(g.update(&obs(40.0), &l).0 < before);
}

#[test]
fn a_full_link_stays_full_until_it_delivers_clearly_less() {
    use super::pid::PidGains;
    let l = limits();
    // The bursty link of the test above (0.8 Mbit/s per request/s, at most 18 Mbit/s) until the
    // hold is set; then windows that deliver `share` of the ceiling at the held rate.
    let after = |share: f64| {
        let mut pid = without_startup(PidGains::default(), &l);
        let mut rate: f64 = l.max_rps * 0.1;
        let mut k = 0;
        let mut period = |pid: &mut super::pid::Pid, delivered: f64| {
            let (p95, p50) = if k == 0 { (10.8, 10.8) } else { (38.9, 11.0) };
            let obs = Observation {
                now: k as f64,
                p95_rtt_ms: Some(p95),
                p50_rtt_ms: Some(p50),
                delivered_mbit_s: Some(delivered),
                predicted_p95_ms: Some(p95),
                ..Observation::default()
            };
            k += 1;
            let (r, _) = pid.update(&obs, &l);
            pid.applied(r);
            r
        };
        for _ in 0..30 {
            rate = period(&mut pid, (rate * 0.8).min(18.0));
        }
        let held = rate;
        assert!(
            held * 0.8 >= 0.95 * 18.0,
            "no full link to hold: {held:.1} req/s"
        );
        let next: Vec<f64> = (0..3).map(|_| period(&mut pid, share * 18.0)).collect();
        (held, next)
    };
    // 93 % of the ceiling, a window after 95 % or more: still full, the rate holds (a 3 % probe
    // at most).
    let (held, next) = after(0.93);
    assert!(
        next.iter().all(|r| *r <= held * 1.031),
        "held {held:.1}, then {next:?}"
    );
    // 85 %: the link has room, the rate climbs again.
    let (held, next) = after(0.85);
    assert!(next[2] > held * 1.05, "held {held:.1}, then {next:?}");
}

/// One period of a bare PID at second `k`: p95 20 ms on its base (a link with room), the backend
/// queued or not; returns the rate applied.
fn backend_period(pid: &mut super::pid::Pid, l: &Limits, k: usize, queued: bool) -> f64 {
    let obs = Observation {
        now: k as f64,
        p95_rtt_ms: Some(20.0),
        p50_rtt_ms: Some(20.0),
        predicted_p95_ms: Some(20.0),
        backend_queued: queued,
        ..Observation::default()
    };
    let (rate, _) = pid.update(&obs, l);
    pid.applied(rate);
    rate
}

#[test]
fn a_queueing_backend_ends_startup_and_holds_the_rate() {
    use super::pid::{Pid, PidGains};
    let l = limits();
    let mut pid = Pid::new(PidGains::default(), &l);
    // Startup doubles while the link has room and the backend keeps up …
    let r1 = backend_period(&mut pid, &l, 0, false);
    let r2 = backend_period(&mut pid, &l, 1, false);
    assert!(r2 > 1.9 * r1, "startup did not double: {r1} → {r2}");
    // … the backend queues: back to the rate before, although the RTT shows no queue.
    let r3 = backend_period(&mut pid, &l, 2, true);
    assert!(
        (r3 - r1).abs() < 1e-6 * r1,
        "startup not over at the backend's queue: {r2} → {r3}"
    );
    // While it keeps queueing the rate does not climb, though the link still has room.
    let mut last = r3;
    for k in 3..10 {
        let r = backend_period(&mut pid, &l, k, true);
        assert!(
            r <= last + 1e-9,
            "period {k}: rate rose {last} → {r} with the backend queued"
        );
        last = r;
    }
    // Once the backend keeps up again the link's room is probed as before.
    let mut r = last;
    for k in 10..16 {
        r = backend_period(&mut pid, &l, k, false);
    }
    assert!(
        r > 1.2 * last,
        "no probing after the backend's queue: {last} → {r}"
    );
}

#[test]
fn a_backend_that_queued_is_not_remembered_as_the_paths_limit() {
    use super::pid::{Pid, PidGains};
    // The compute-bound test bed: startup ended on the backend's queue at 12 req/s, the loop
    // remembered that rate as the one that overloads the path and crept past it 5 % a period —
    // the batch rate held 10.6–12.2 req/s in every full run while the unpaced arm served 13–21.
    // The backend's side is the concurrency limit's (`control::compute`); once the backend keeps
    // up the path's room is probed as usual.
    let l = limits();
    let mut pid = Pid::new(PidGains::default(), &l);
    backend_period(&mut pid, &l, 0, false);
    backend_period(&mut pid, &l, 1, true);
    backend_period(&mut pid, &l, 2, false);
    backend_period(&mut pid, &l, 3, false);
    backend_period(&mut pid, &l, 4, true);
    let exit = backend_period(&mut pid, &l, 5, true);
    let mut r = exit;
    for k in 6..11 {
        r = backend_period(&mut pid, &l, k, false);
    }
    assert!(
        r > 1.6 * exit,
        "five calm periods after the backend's queue: {exit:.2} → {r:.2}"
    );
}

#[test]
fn one_window_of_backend_queue_does_not_end_startup() {
    use super::pid::{Pid, PidGains};
    // The network-bound test bed: a group's first requests reached the backend together and its
    // second window queued past the objective; startup ended at 10 req/s and the loop crept up
    // 5 % a period for 12 s under the remembered rate. One such window steps back; the search
    // goes on when the next shows no queue.
    let l = limits();
    let mut pid = Pid::new(PidGains::default(), &l);
    let r1 = backend_period(&mut pid, &l, 0, false);
    let r2 = backend_period(&mut pid, &l, 1, true);
    assert!(
        r2 <= r1 * 1.001,
        "no step back at the backend's queue: {r1} → {r2}"
    );
    let r3 = backend_period(&mut pid, &l, 2, false);
    let r4 = backend_period(&mut pid, &l, 3, false);
    assert!(
        r3 > 1.9 * r2 && r4 > 1.9 * r3,
        "startup ended on one window of backend queue: {r2} → {r3} → {r4}"
    );
    // A second queue ends it there, at the rate before it (not half of that).
    let r5 = backend_period(&mut pid, &l, 4, true);
    assert!(
        (r5 - r3).abs() < 1e-6 * r3,
        "{r4} → {r5}, the rate before was {r3}"
    );
    let r6 = backend_period(&mut pid, &l, 5, true);
    assert!(r6 <= r5 + 1e-9, "rose with the backend queued: {r5} → {r6}");
}

/// One control period of a bare PID with a whole window: p95, median and what the link
/// delivered; returns the rate applied.
fn pid_window(
    pid: &mut super::pid::Pid,
    l: &Limits,
    k: usize,
    (p95, p50): (f64, f64),
    delivered_mbit_s: f64,
) -> f64 {
    observe(pid, l, k, p95, Some(p50), Some(delivered_mbit_s))
}

/// A PID holding a standing queue at the setpoint on a link that delivers 0.8 Mbit/s per
/// request/s; returns it, the next period and the rate it holds.
fn pid_at_the_setpoint(g: super::pid::PidGains) -> (super::pid::Pid, usize, f64) {
    pid_at_the_setpoint_scored(g, 0.0)
}

/// [`pid_at_the_setpoint`] with the Isolation Forest's score at `anomaly` throughout (no damping
/// reaches a p95 at the setpoint, so the history is the same at any score).
fn pid_at_the_setpoint_scored(
    g: super::pid::PidGains,
    anomaly: f64,
) -> (super::pid::Pid, usize, f64) {
    let l = limits();
    let mut pid = super::pid::Pid::new(g, &l);
    let mut rate = l.max_rps * 0.1;
    let mut k = 0;
    for (p95, p50) in [(20.0, 20.0), (20.0, 20.0)]
        .into_iter()
        .chain(std::iter::repeat_n((50.0, 48.0), 12))
    {
        rate = observe_scored(&mut pid, &l, k, p95, Some(p50), Some(rate * 0.8), anomaly);
        k += 1;
    }
    (pid, k, rate)
}

/// A PID at the setpoint whose link narrowed to a quarter, the first full window after the step
/// delivering only 80 % of what the link carries (TCP recovering from the step's drops: the fit
/// reads 20 % low), cut and drained — the draining window still delivering 80 %, so the fit read
/// low is the one held; returns it, the next period, the rate it holds, what the narrowed link
/// carries (Mbit/s) and the rate that held the setpoint before.
fn narrowed_with_a_fit_read_low() -> (super::pid::Pid, usize, f64, f64, f64) {
    narrowed_with_a_fit_read_low_drained_at(0.8)
}

/// [`narrowed_with_a_fit_read_low`], the draining window (its queue standing all through)
/// delivering this share of what the link carries.
fn narrowed_with_a_fit_read_low_drained_at(share: f64) -> (super::pid::Pid, usize, f64, f64, f64) {
    let l = limits();
    let (mut pid, k, r0) = pid_at_the_setpoint(super::pid::PidGains::default());
    let link_mbit = r0 * 0.8 / 4.0;
    pid_window(&mut pid, &l, k, (320.0, 320.0), link_mbit * 0.8);
    let rate = pid_window(&mut pid, &l, k + 1, (300.0, 280.0), link_mbit * share);
    (pid, k + 2, rate, link_mbit, r0)
}

#[test]
fn a_fit_read_low_is_raised_by_the_draining_window_that_delivered_the_whole_link() {
    let l = limits();
    // The step's first window read the link 20 % low; the next, its queue standing all through
    // as well (the link busy from end to end of both), 20 % high — the acknowledgements the
    // first lacked under loss (on the test bed 3.6, then 5.3 Mbit/s of a 4.7 Mbit/s link). The
    // two together delivered all the link carries: the loop goes to their fit…
    let (mut pid, k, rate, link_mbit, r0) = narrowed_with_a_fit_read_low_drained_at(1.2);
    let fit = r0 / 4.0;
    assert!(
        (rate / fit - 1.0).abs() < 0.03,
        "after the draining window: {rate:.2}, the link fits {fit:.2}"
    );
    // …and stays there when the next window's queue drained partway (median at its floor,
    // delivering what the cut sent): that window did not keep the link busy.
    let next = pid_window(&mut pid, &l, k, (43.0, 20.0), link_mbit * 0.8);
    assert!(
        next >= fit * 0.97,
        "{rate:.2} → {next:.2} where {fit:.2} fits"
    );
}

#[test]
fn a_narrowed_link_is_cut_to_the_rate_that_fits_it_less_a_drain() {
    use super::pid::PidGains;
    let l = limits();
    let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
    // The link narrows to a quarter: the buffer fills (320 ms), the link delivers a quarter of
    // what it did. The rate that fits is a quarter of the old one; the cut goes 27 % under it
    // (the queue's 270 ms over the setpoint, drained within a period), then back to it while the
    // window still shows the draining queue.
    let fit = r0 / 4.0;
    let cut = pid_window(&mut pid, &l, k, (320.0, 320.0), r0 * 0.8 / 4.0);
    let held = pid_window(&mut pid, &l, k + 1, (300.0, 180.0), r0 * 0.8 / 4.0);
    assert!(
        (cut / (fit * 0.73) - 1.0).abs() < 0.03,
        "from {r0:.2}: cut to {cut:.2}, expected {:.2}",
        fit * 0.73
    );
    assert!(
        (held / fit - 1.0).abs() < 0.03,
        "while draining: {held:.2}, expected the fit {fit:.2}"
    );
}

#[test]
fn a_backend_queue_while_a_narrowed_links_queue_drains_does_not_hold_the_drain_rate() {
    use super::pid::PidGains;
    let l = limits();
    // The narrowed link's cut to the fit less the drain, then the window that drains the queue —
    // once with the backend's queue past its objective in that window (the uploads the full
    // buffer held back reach it together): the rate goes back to the fit all the same. Holding it
    // at the cut on the test bed left the loop 27 % under the link, climbing 5 % a period.
    let run = |queued: bool| {
        let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
        let link = r0 * 0.8 / 4.0;
        let cut = pid_window(&mut pid, &l, k, (320.0, 320.0), link);
        let obs = Observation {
            now: (k + 1) as f64,
            p95_rtt_ms: Some(300.0),
            p50_rtt_ms: Some(180.0),
            delivered_mbit_s: Some(link),
            predicted_p95_ms: Some(300.0),
            backend_queued: queued,
            ..Observation::default()
        };
        let (back, _) = pid.update(&obs, &l);
        (cut, back, r0 / 4.0)
    };
    let (cut, back, fit) = run(true);
    assert!(
        (back / fit - 1.0).abs() < 0.03,
        "cut to {cut:.2}, then {back:.2} with the backend queued; the fit is {fit:.2}"
    );
    assert!((back / run(false).1 - 1.0).abs() < 1e-9);
}

#[test]
fn a_path_that_widens_is_searched_again_by_doubling() {
    use super::pid::PidGains;
    let l = limits();
    let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
    // The standing queue is gone at the same rate: one such window probes as usual…
    let probed = pid_window(&mut pid, &l, k, (20.0, 20.0), r0 * 0.8);
    assert!(
        probed < r0 * 1.3,
        "{r0:.2} → {probed:.2} after one empty window"
    );
    // …a second, after the probe, shows the path widened: startup doubles again.
    let doubled = pid_window(&mut pid, &l, k + 1, (20.0, 20.0), probed * 0.8);
    assert!(
        doubled > probed * 1.9,
        "{probed:.2} → {doubled:.2} after the queue stayed gone"
    );
}

#[test]
fn a_queue_that_vanishes_once_does_not_restart_the_search() {
    use super::pid::PidGains;
    let l = limits();
    let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
    // Cross traffic eases for a second: the queue is gone once, then back.
    let mut rate = pid_window(&mut pid, &l, k, (20.0, 20.0), r0 * 0.8);
    rate = pid_window(&mut pid, &l, k + 1, (50.0, 48.0), rate * 0.8);
    let next = pid_window(&mut pid, &l, k + 2, (20.0, 20.0), rate * 0.8);
    assert!(next < rate * 1.3, "{rate:.2} → {next:.2}");
}

#[test]
fn a_queue_held_at_the_setpoint_for_minutes_is_not_taken_for_the_base() {
    // The base RTT creeps up so that a route change is followed, but not while the p95 sits in
    // the band: after about 90 s at the setpoint the crept base read the queue as none, and the
    // loop probed past the link's rate.
    let quiet = Plant {
        cross_walk: 0.0,
        capacity_steps: vec![(0.0, 5.0)],
        duration_s: 300.0,
        ..Plant::default()
    };
    let run = simulate(ControllerKind::Pid, &quiet, limits(), 1);
    let out: Vec<_> = run[30..]
        .iter()
        .filter(|p| (p.p95_ms - 50.0).abs() > 10.0)
        .map(|p| (p.t, p.p95_ms))
        .collect();
    assert!(out.is_empty(), "out of the band after settling: {out:?}");
}

#[test]
fn a_narrowed_link_that_widens_again_is_searched_again() {
    use super::pid::PidGains;
    let l = limits();
    let (mut pid, mut k, r0) = pid_at_the_setpoint(PidGains::default());
    // Narrowed to a quarter: cut to the fit and drained (as in the test above).
    let fit_mbit = r0 * 0.8 / 4.0;
    pid_window(&mut pid, &l, k, (320.0, 320.0), fit_mbit);
    let mut rate = pid_window(&mut pid, &l, k + 1, (300.0, 180.0), fit_mbit);
    k += 2;
    // Held at the fit with bursts (the median at the base: no standing queue to lose)…
    for _ in 0..3 {
        rate = pid_window(&mut pid, &l, k, (45.0, 20.0), rate * 0.8);
        k += 1;
    }
    let held = rate;
    // …then the link widens: at the rate that filled it, no queue at all, three windows running.
    let first = pid_window(&mut pid, &l, k, (20.0, 20.0), held * 0.8);
    let second = pid_window(&mut pid, &l, k + 1, (20.0, 20.0), first * 0.8);
    assert!(second < first * 1.3, "{first:.2} → {second:.2} after two");
    // The third restarts the search: from a quarter up (the fit may have read low), the step
    // doubling each period while no queue appears.
    let mut rates = vec![second];
    for i in 0..4 {
        let r = *rates.last().unwrap_or(&second);
        rates.push(pid_window(&mut pid, &l, k + 2 + i, (20.0, 20.0), r * 0.8));
    }
    let steps: Vec<f64> = rates.windows(2).map(|w| w[1] / w[0]).collect();
    for (got, want) in steps.iter().zip([1.25, 1.5, 2.0, 2.0]) {
        assert!(
            (got / want - 1.0).abs() < 0.02,
            "held {held:.2}: {first:.2} → {rates:.2?} after the queue stayed gone"
        );
    }
}

#[test]
fn a_search_restarted_from_a_fit_read_low_overshoots_by_a_quarter_not_double() {
    let l = limits();
    let (mut pid, mut k, mut rate, link_mbit, r0) = narrowed_with_a_fit_read_low();
    // Under the link, no queue; after three such windows the search restarts.
    let mut most: f64 = 0.0;
    for _ in 0..6 {
        let window = if rate * 0.8 > link_mbit {
            (320.0, 300.0)
        } else {
            (20.0, 20.0)
        };
        rate = pid_window(&mut pid, &l, k, window, (rate * 0.8).min(link_mbit));
        most = most.max(rate);
        k += 1;
    }
    let fit = r0 / 4.0;
    assert!(
        most > fit && most <= fit * 1.3,
        "searched up to {most:.2} where {fit:.2} fits"
    );
}

#[test]
fn a_fit_read_high_across_the_step_is_lowered_by_the_window_after_the_drain() {
    use super::pid::PidGains;
    let l = limits();
    let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
    let fit = r0 / 4.0;
    // The link narrows to a quarter, but the first window that shows it straddled the step and
    // delivered 1.5× what the link now carries: the fit it gives reads 1.5× too high.
    pid_window(&mut pid, &l, k, (320.0, 320.0), r0 * 0.8 * 1.5 / 4.0);
    // Draining; then the window after the drain: a standing queue under the setpoint, the link
    // delivering all it now carries.
    pid_window(&mut pid, &l, k + 1, (300.0, 180.0), r0 * 0.8 / 4.0);
    let mut most: f64 = 0.0;
    for i in 0..6 {
        let window = if i == 0 { (40.0, 35.0) } else { (45.0, 40.0) };
        let rate = pid_window(&mut pid, &l, k + 2 + i, window, r0 * 0.8 / 4.0);
        most = most.max(rate);
    }
    assert!(
        most <= fit * 1.05,
        "climbed to {most:.2} under the setpoint where {fit:.2} fits (the straddled fit {:.2})",
        fit * 1.5
    );
}

#[test]
fn a_draining_window_that_still_drops_returns_under_the_fit_it_was_read_from() {
    use super::pid::PidGains;
    let l = limits();
    // The link narrows to a quarter; the window that shows it straddled the step and delivered
    // 1.25× what the link now carries. The draining window after the cut, with `retransmits`
    // per second: the loop goes back to the fit read from the first, under it by the fit's
    // margin (10 %) while the window still drops, to the fit itself once it does not.
    // The window after that, without retransmissions, its queue drained partway through (no
    // queue in its p95, 95 % of the link delivered): the loop refits on it, not back to the fit
    // read high.
    let held_after = |retransmits: f64, windows: &[(f64, f64)], over: f64| {
        let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
        let read = r0 * over / 4.0;
        let mut rate = 0.0;
        for (i, &(p95, p50)) in windows.iter().enumerate() {
            let obs = Observation {
                now: (k + i) as f64,
                p95_rtt_ms: Some(p95),
                p50_rtt_ms: Some(p50),
                delivered_mbit_s: Some(if i < 2 {
                    read * 0.8
                } else {
                    r0 * 0.8 / 4.0 * 0.95
                }),
                predicted_p95_ms: Some(p95),
                retransmits_per_s: if i < 2 { retransmits } else { 0.0 },
                ..Observation::default()
            };
            rate = pid.update(&obs, &l).0;
            pid.applied(rate);
        }
        (rate, read, r0 / 4.0)
    };
    let drain = [(320.0, 320.0), (300.0, 180.0)];
    let (dropping, read, fits) = held_after(40.0, &drain, 1.25);
    let (clean, _, _) = held_after(0.0, &drain, 1.25);
    let after_drain = [drain[0], drain[1], (16.0, 11.0)];
    let (after, _, _) = held_after(40.0, &after_drain, 1.25);
    // A fit read only 4 % high is refitted too (within the fit's margin, but the suspect one).
    let (after_near, near, _) = held_after(40.0, &after_drain, 1.04);
    assert!(
        (dropping / (read * 0.9) - 1.0).abs() < 0.03,
        "still dropping: {dropping:.2}, expected {:.2} (the fit read {read:.2}, less 10 %)",
        read * 0.9
    );
    assert!(
        (clean / read - 1.0).abs() < 0.03,
        "no drops: {clean:.2}, expected the fit {read:.2}"
    );
    assert!(
        after <= fits * 1.02 && after >= fits * 0.9,
        "the clean window after: {after:.2} where {fits:.2} fits (the fit read {read:.2})"
    );
    assert!(
        after_near <= fits * 1.02,
        "the clean window after: {after_near:.2} where {fits:.2} fits (the fit read {near:.2})"
    );
}

#[test]
fn a_queue_falling_from_the_buffer_after_a_drain_is_not_cut_by_half() {
    use super::pid::PidGains;
    let l = limits();
    let (mut pid, k, r0) = pid_at_the_setpoint(PidGains::default());
    let fit = r0 / 4.0;
    // Narrowed to a quarter: cut, drained; the next window's p95 is still over three times the
    // setpoint, but down from the buffer by half — draining, not a full buffer to halve.
    pid_window(&mut pid, &l, k, (320.0, 320.0), r0 * 0.8 / 4.0);
    pid_window(&mut pid, &l, k + 1, (300.0, 180.0), r0 * 0.8 / 4.0);
    let next = pid_window(&mut pid, &l, k + 2, (170.0, 80.0), r0 * 0.8 / 4.0);
    assert!(
        next >= 0.75 * fit,
        "a queue falling 300 → 170 ms: {next:.2} where {fit:.2} fits"
    );
}

#[test]
fn a_drain_sized_to_the_queue_is_not_damped_again_by_the_anomaly_score() {
    use super::pid::PidGains;
    let l = limits();
    // The same history twice, once with the forest alarmed throughout: at the setpoint (no
    // damping there), then the link narrows to a quarter — the cut to the fit less the queue's
    // excess, then the period that drains it. Damping those as well emptied the link on the test
    // bed (the window after the drain read 11–16 ms).
    let run = |anomaly: f64| {
        let (mut pid, k, r0) = pid_at_the_setpoint_scored(PidGains::default(), anomaly);
        let link_mbit = r0 * 0.8 / 4.0;
        [(320.0, 320.0), (300.0, 180.0)]
            .into_iter()
            .enumerate()
            .map(|(i, (p95, p50))| {
                observe_scored(
                    &mut pid,
                    &l,
                    k + i,
                    p95,
                    Some(p50),
                    Some(link_mbit),
                    anomaly,
                )
            })
            .collect::<Vec<f64>>()
    };
    let (alarmed, calm) = (run(1.0), run(0.0));
    for (a, c) in alarmed.iter().zip(&calm) {
        assert!((a / c - 1.0).abs() < 1e-9, "{alarmed:.3?} vs {calm:.3?}");
    }
}

#[test]
fn a_search_restarted_from_a_held_fit_ends_where_the_p95_reaches_the_band() {
    let l = limits();
    // Narrowed to a quarter, the fit read 20 % low, no queue for three windows: the search
    // restarts a quarter up…
    let (mut pid, mut k, mut rate, _, _) = narrowed_with_a_fit_read_low();
    let mut rates = Vec::new();
    while rates.len() < 8 && !rates.windows(2).any(|w: &[f64]| w[1] > w[0] * 1.2) {
        rate = pid_window(&mut pid, &l, k, (20.0, 20.0), rate * 0.8);
        rates.push(rate);
        k += 1;
    }
    let searched = rate;
    assert!(rates.len() < 8, "no search restarted: {rates:.2?}");
    // …and the first window at that rate puts the p95 in the band, under the setpoint: the
    // search is over there (the next step, half again, overshot on the test bed: 47 ms, then
    // 139).
    let next = pid_window(&mut pid, &l, k, (47.0, 40.0), searched * 0.8);
    assert!(
        next <= searched * 1.05,
        "{searched:.2} → {next:.2} with the p95 in the band"
    );
}

#[test]
fn a_queue_emptied_by_a_cut_returns_to_the_rate_before_it_not_past_it() {
    use super::pid::PidGains;
    let l = limits();
    // At the setpoint with the forest's score where heavy load leaves it on the test bed (0.65):
    // a window at 59 ms is damped, the queue empties, and the next window shows none. That window
    // says the cut emptied the queue, not that the link has room over the rate that held the
    // setpoint: going 5 % past it filled the buffer to 78 ms two windows later on the test bed.
    let (mut pid, k, r0) = pid_at_the_setpoint_scored(PidGains::default(), 0.65);
    let cut = observe_scored(&mut pid, &l, k, 59.0, Some(50.0), Some(r0 * 0.8), 0.65);
    assert!(cut < r0 * 0.97, "no cut at 59 ms: {cut:.2} from {r0:.2}");
    let back = observe_scored(&mut pid, &l, k + 1, 21.0, Some(20.0), Some(cut * 0.8), 0.65);
    assert!(
        back > cut && back <= r0 * 1.005,
        "after the cut {cut:.2} the rate went to {back:.2}, the setpoint's was {r0:.2}"
    );
    // Still no queue a period later: the search goes on from there, a step at a time.
    let next = observe_scored(
        &mut pid,
        &l,
        k + 2,
        21.0,
        Some(20.0),
        Some(back * 0.8),
        0.65,
    );
    assert!(
        next > back * 1.01 && next <= back * 1.06,
        "{back:.2} → {next:.2}"
    );
}

#[test]
fn startup_is_not_ended_by_bursts_at_a_low_setpoint() {
    use super::pid::{Pid, PidGains};
    // The test bed's first windows at 25 ms and 15 ms setpoints: the first connections' bursts
    // put the p95 past the setpoint (at 15 ms, past the overload margin too) while the median
    // sits at the path's floor and the link is nearly idle.
    for (sp, p95, p50) in [(25.0, 25.6, 10.75), (15.0, 23.6, 9.7)] {
        let l = Limits {
            setpoint_ms: sp,
            ..limits()
        };
        let mut pid = Pid::new(PidGains::default(), &l);
        let r0 = l.max_rps * 0.1;
        let r1 = observe(&mut pid, &l, 0, p95, Some(p50), Some(0.5));
        assert!(
            r1 > r0 * 1.9,
            "setpoint {sp}: startup ended on bursts: {r0:.2} → {r1:.2}"
        );
        // A queue the median shows ends it.
        let r2 = observe(&mut pid, &l, 1, sp + 1.0, Some(sp - 3.0), Some(r1 * 0.8));
        assert!(
            r2 < r1,
            "setpoint {sp}: a standing queue did not end startup: {r1:.2} → {r2:.2}"
        );
    }
}

#[test]
fn a_queue_shrunk_by_a_cut_does_not_lift_the_integral_as_room_would() {
    use super::pid::PidGains;
    let l = limits();
    // As above, but the window after the cut still shows bursts (p95 35 ms over a median at its
    // floor): the room under the setpoint is the cut's, and the integral that held the setpoint
    // moves on seconds of error (here +0.75 %, with the proportional term's +1.5 %) rather than
    // on the relative error (+9 %: 11 % over in all).
    // (No memory of an overload rate here, whose hold would cap the climb.)
    let mut pid = without_startup(PidGains::default(), &l);
    let mut r0 = l.max_rps * 0.1;
    let k = 12;
    for i in 0..k {
        let (p95, p50) = if i < 2 { (20.0, 20.0) } else { (50.0, 48.0) };
        r0 = observe_scored(&mut pid, &l, i, p95, Some(p50), Some(r0 * 0.8), 0.65);
    }
    let cut = observe_scored(&mut pid, &l, k, 59.0, Some(50.0), Some(r0 * 0.8), 0.65);
    assert!(cut < r0 * 0.97, "no cut at 59 ms: {cut:.2} from {r0:.2}");
    let back = observe_scored(&mut pid, &l, k + 1, 35.0, Some(20.0), Some(cut * 0.8), 0.65);
    assert!(
        back <= r0 * 1.04,
        "after the cut {cut:.2} the rate went to {back:.2}, the setpoint's was {r0:.2}"
    );
}

/// A PID whose startup overloaded a 16 Mbit/s link (the ceiling), held at the setpoint there, then
/// saw the link narrow to 4 Mbit/s, cut to the fit and drained it, the forest's score at
/// `anomaly` throughout; returns it, the next period and the rate it holds.
fn narrowed_under_its_ceiling(anomaly: f64) -> (super::pid::Pid, usize, f64) {
    let l = limits();
    let mut pid = super::pid::Pid::new(super::pid::PidGains::default(), &l);
    let mut rate = l.max_rps * 0.1;
    let mut k = 0;
    let mut window = |pid: &mut super::pid::Pid, p95: f64, p50: f64, mbit: f64| {
        let r = observe_scored(pid, &l, k, p95, Some(p50), Some(mbit), anomaly);
        k += 1;
        r
    };
    for _ in 0..2 {
        rate = window(&mut pid, 20.0, 20.0, rate * 0.8);
    }
    window(&mut pid, 150.0, 120.0, 16.0);
    for _ in 0..10 {
        window(&mut pid, 50.0, 48.0, 16.0);
    }
    window(&mut pid, 320.0, 320.0, 4.0);
    rate = window(&mut pid, 300.0, 180.0, 4.0);
    (pid, k, rate)
}

#[test]
fn on_a_narrowed_link_held_at_its_fit_the_damping_does_not_empty_the_queue() {
    let l = limits();
    // At 59 ms, 19 ms over the band's lower edge: the damping gives up at most that much queue
    // in the period (about 2 %; 3 % with the proportional and integral terms), not the 13 % that
    // emptied the narrowed link's queue to 21 ms.
    let (mut pid, k, r0) = narrowed_under_its_ceiling(0.75);
    let r1 = observe_scored(&mut pid, &l, k, 59.0, Some(50.0), Some(4.0), 0.75);
    assert!(r1 > r0 * 0.95, "damped from {r0:.2} to {r1:.2}");
    // On the full link the same score and p95 damp as before.
    let (mut pid, k, _) = pid_at_the_setpoint_scored(super::pid::PidGains::default(), 0.75);
    let before = observe_scored(&mut pid, &l, k, 50.0, Some(48.0), Some(16.0), 0.75);
    let full = observe_scored(&mut pid, &l, k + 1, 59.0, Some(50.0), Some(16.0), 0.75);
    assert!(
        full < before * 0.93,
        "not damped on the full link: {before:.2} → {full:.2}"
    );
}

#[test]
fn under_the_band_at_a_narrowed_links_fit_the_rate_builds_the_missing_queue() {
    let l = limits();
    // 30 ms, a queue but under the band: the rate goes over the fit by the missing 20 ms of the
    // period (2 %), where the hold at the fit alone left the p95 under the band for three periods.
    let (mut pid, k, r0) = narrowed_under_its_ceiling(0.0);
    let r1 = observe_scored(&mut pid, &l, k, 30.0, Some(28.0), Some(4.0), 0.0);
    assert!(r1 > r0 * 1.015, "held at {r0:.2} → {r1:.2} under the band");
    assert!(r1 < r0 * 1.11, "{r0:.2} → {r1:.2}");
}

#[test]
fn a_p95_a_bucket_over_the_floor_is_not_a_widened_path() {
    use super::pid::{Pid, PidGains};
    // The test bed's `pid@15`: a 10.8 ms floor, where the agent's buckets are 1 ms wide, so a
    // quarter of the room to a 15 ms setpoint is one bucket. A queue at the setpoint, then
    // readings one bucket over the floor at the same rate, read as the path widened and doubled
    // the rate (47.9 req/s against 23.8, p95 238 ms).
    let l = Limits {
        setpoint_ms: 15.0,
        ..limits()
    };
    let mut pid = Pid::new(PidGains::default(), &l);
    let mut rate = l.max_rps * 0.1;
    let mut k = 0;
    let mut window = |pid: &mut Pid, (p95, p50): (f64, f64), rate: f64| {
        k += 1;
        observe(pid, &l, k, p95, Some(p50), Some(rate * 0.8))
    };
    for w in [(10.8, 10.8), (10.8, 10.8)]
        .into_iter()
        .chain(std::iter::repeat_n((15.5, 12.5), 12))
    {
        rate = window(&mut pid, w, rate);
    }
    let held = rate;
    for _ in 0..4 {
        rate = window(&mut pid, (11.8, 11.0), rate);
        assert!(
            rate < held * 1.3,
            "{held:.2} → {rate:.2} on readings one bucket over the floor"
        );
    }
}

#[test]
fn a_queue_emptied_by_the_anomaly_damping_is_not_a_widened_path() {
    use super::pid::PidGains;
    let l = limits();
    // The full run at 3ba9d19, `pid` on the network-bound test bed: a standing queue past the
    // setpoint, damped 10 % and then 9 % by an anomaly score of 0.66 at a rate held steady; the
    // queue was gone in the next window, and the one after (no queue again) was read as the path
    // widened: startup doubled 23.8 → 47.7 req/s and the p95 reached 238 ms. The queue went
    // because of the cuts, which the widening test — the rate held from one period to the next —
    // did not see, both periods being cut alike.
    let (mut pid, k, r0) = pid_at_the_setpoint_scored(PidGains::default(), 0.66);
    let mut rate = r0;
    for (i, w) in [(63.0, 45.0), (59.0, 45.0), (20.0, 20.0), (22.0, 20.0)]
        .into_iter()
        .enumerate()
    {
        rate = observe_scored(&mut pid, &l, k + i, w.0, Some(w.1), Some(rate * 0.8), 0.66);
        assert!(rate < r0 * 1.3, "window {i} {w:?}: {r0:.2} → {rate:.2}");
    }
}
