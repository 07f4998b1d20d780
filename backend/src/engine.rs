//! The scheduler: one thread owns the model and runs iteration-level ("continuous") batching —
//! every step decodes one token for each running sequence and admits waiting sequences (whole
//! prompt prefill) while the step's token budget and the cap on running sequences allow. Each
//! sequence has its own KV cache (candle's Llama cache is per sequence), so the sequences of a
//! step run one after another on the same weights rather than as one fused batch.
//!
//! A request whose client went away (its event receiver dropped) is removed at the next step.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use candle_transformers::{generation::LogitsProcessor, models::llama::Cache};
use tokio::sync::mpsc::UnboundedSender;

use crate::{markers, model::Model};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences decoded in the same step.
    pub max_running: usize,
    /// Requests waiting for a slot; beyond it, new requests are refused (HTTP 429).
    pub max_waiting: usize,
    /// Tokens processed per step (prefill tokens + one per decoding sequence).
    pub token_budget: usize,
}

pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Generate `max_tokens` even when the model samples its end-of-sequence token.
    pub ignore_eos: bool,
    pub submitted: Instant,
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Prefill done and the first token sampled (its text follows as a `Text` event).
    Started {
        queue: Duration,
        prefill: Duration,
    },
    Text(String),
    Done(Finish),
    Failed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue: Duration,
    pub prefill: Duration,
}

/// The handle the HTTP side holds.
pub struct Engine {
    tx: mpsc::Sender<Request>,
    pub waiting: Arc<AtomicUsize>,
    pub running: Arc<AtomicUsize>,
    pub limits: Limits,
    pub model_name: String,
    pub max_len: usize,
    next_id: AtomicUsize,
}

pub enum Refused {
    Overloaded,
    Stopped,
}

impl Engine {
    pub fn start(model: Model, limits: Limits) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let e = Arc::new(Self {
            tx,
            waiting: waiting.clone(),
            running: running.clone(),
            limits,
            model_name: model.name.clone(),
            max_len: model.max_len(),
            next_id: AtomicUsize::new(1),
        });
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || {
                Scheduler {
                    model,
                    limits,
                    waiting_n: waiting,
                    running_n: running,
                }
                .run(rx)
            })
            .ok();
        e
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) as u64
    }

    /// Queues a request, or refuses it when the waiting queue is full.
    pub fn submit(&self, r: Request) -> Result<(), Refused> {
        // Reserve a waiting slot first so that concurrent submits cannot overfill the queue.
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.limits.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Overloaded);
        }
        markers::request_start(r.id);
        self.tx.send(r).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            Refused::Stopped
        })
    }
}

struct Seq {
    req: Request,
    cache: Cache,
    sampler: LogitsProcessor,
    tokens: Vec<u32>,
    generated: Vec<u32>,
    emitted: usize,
    queue: Duration,
    prefill: Duration,
    last_token_at: Instant,
}

struct Scheduler {
    model: Model,
    limits: Limits,
    waiting_n: Arc<AtomicUsize>,
    running_n: Arc<AtomicUsize>,
}

impl Scheduler {
    fn run(self, rx: mpsc::Receiver<Request>) {
        let mut waiting: VecDeque<Request> = VecDeque::new();
        let mut running: Vec<Seq> = Vec::new();
        loop {
            // Block only when there is nothing to do.
            if waiting.is_empty() && running.is_empty() {
                match rx.recv() {
                    Ok(r) => waiting.push_back(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                waiting.push_back(r);
            }
            // Clients that went away.
            waiting.retain(|r| {
                let keep = !r.events.is_closed();
                if !keep {
                    self.waiting_n.fetch_sub(1, Ordering::SeqCst);
                    metrics::counter!("tokenflow_backend_cancelled_total").increment(1);
                }
                keep
            });
            running.retain(|s| {
                let keep = !s.req.events.is_closed();
                if !keep {
                    markers::request_end(s.req.id);
                    metrics::counter!("tokenflow_backend_cancelled_total").increment(1);
                }
                keep
            });

            let mut budget = self.limits.token_budget;
            let mut finished = Vec::new();
            for (i, s) in running.iter_mut().enumerate() {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                match self.decode(s) {
                    Ok(Some(reason)) => finished.push((i, reason)),
                    Ok(None) => {}
                    Err(e) => {
                        let _ = s.req.events.send(Event::Failed(format!("{e:#}")));
                        finished.push((i, "error"));
                    }
                }
            }
            for (i, reason) in finished.into_iter().rev() {
                let s = running.remove(i);
                self.finish(s, reason);
            }
            // Admit: first come, first served; a prompt larger than the whole budget still runs
            // when it would otherwise never fit.
            while running.len() < self.limits.max_running {
                let Some(front) = waiting.front() else { break };
                let fits = front.prompt.len() <= budget
                    || (running.is_empty() && budget == self.limits.token_budget);
                if !fits {
                    break;
                }
                let Some(r) = waiting.pop_front() else { break };
                self.waiting_n.fetch_sub(1, Ordering::SeqCst);
                budget = budget.saturating_sub(r.prompt.len());
                match self.prefill(r) {
                    Ok((s, None)) => running.push(s),
                    Ok((s, Some(reason))) => self.finish(s, reason),
                    Err(e) => tracing::warn!("prefill failed: {e:#}"),
                }
            }
            self.running_n.store(running.len(), Ordering::SeqCst);
            metrics::gauge!("vllm:num_requests_running", "model_name" => self.model.name.clone())
                .set(running.len() as f64);
            metrics::gauge!("vllm:num_requests_waiting", "model_name" => self.model.name.clone())
                .set(waiting.len() as f64);
            let held: usize = running.iter().map(|s| s.tokens.len()).sum();
            let capacity = (self.limits.max_running * self.model.max_len()).max(1);
            metrics::gauge!("vllm:gpu_cache_usage_perc", "model_name" => self.model.name.clone())
                .set(held as f64 / capacity as f64);
        }
    }

    fn prefill(&self, req: Request) -> Result<(Seq, Option<&'static str>)> {
        let queue = req.submitted.elapsed();
        markers::scheduled(req.id);
        let t0 = Instant::now();
        let mut cache = self.model.new_cache()?;
        let temperature = (req.temperature > 1e-6).then_some(req.temperature);
        let mut sampler = LogitsProcessor::new(req.seed, temperature, req.top_p);
        let logits = self.model.forward(&req.prompt, 0, &mut cache)?;
        let first = sampler.sample(&logits)?;
        let prefill = t0.elapsed();
        markers::first_token(req.id);
        metrics::histogram!("vllm:time_to_first_token_seconds", "model_name" => self.model.name.clone())
            .record(req.submitted.elapsed().as_secs_f64());
        metrics::counter!("vllm:prompt_tokens_total", "model_name" => self.model.name.clone())
            .increment(req.prompt.len() as u64);
        let _ = req.events.send(Event::Started { queue, prefill });
        let mut tokens = req.prompt.clone();
        tokens.push(first);
        let mut s = Seq {
            req,
            cache,
            sampler,
            tokens,
            generated: vec![first],
            emitted: 0,
            queue,
            prefill,
            last_token_at: Instant::now(),
        };
        let done = self.after_token(&mut s);
        Ok((s, done))
    }

    fn decode(&self, s: &mut Seq) -> Result<Option<&'static str>> {
        let pos = s.tokens.len() - 1;
        let last = s.tokens[pos];
        let logits = self.model.forward(&[last], pos, &mut s.cache)?;
        let next = s.sampler.sample(&logits)?;
        metrics::histogram!("vllm:time_per_output_token_seconds", "model_name" => self.model.name.clone())
            .record(s.last_token_at.elapsed().as_secs_f64());
        s.last_token_at = Instant::now();
        s.tokens.push(next);
        s.generated.push(next);
        Ok(self.after_token(s))
    }

    /// Emits new text; returns the finish reason when the sequence is done.
    fn after_token(&self, s: &mut Seq) -> Option<&'static str> {
        let last = *s.generated.last()?;
        let eos = last == self.model.eos && !s.req.ignore_eos;
        let ids = if eos {
            &s.generated[..s.generated.len() - 1]
        } else {
            &s.generated[..]
        };
        let text = self.model.decode(ids);
        if let Some(cut) = s
            .req
            .stop
            .iter()
            .filter_map(|st| text.find(st.as_str()))
            .min()
        {
            if cut > s.emitted && text.is_char_boundary(cut) {
                let _ = s
                    .req
                    .events
                    .send(Event::Text(text[s.emitted..cut].to_string()));
            }
            s.emitted = cut.max(s.emitted);
            return Some("stop");
        }
        // Hold back what could be the start of a stop sequence.
        let hold = s
            .req
            .stop
            .iter()
            .map(|st| st.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut upto = text.len().saturating_sub(hold);
        while upto > s.emitted && !text.is_char_boundary(upto) {
            upto -= 1;
        }
        let done = if eos {
            upto = text.len();
            Some("stop")
        } else if s.generated.len() >= s.req.max_tokens || s.tokens.len() >= self.model.max_len() {
            upto = text.len();
            Some("length")
        } else {
            None
        };
        // Byte-level BPE can leave half a character at the end: emit only whole characters.
        if upto > s.emitted
            && text.is_char_boundary(upto)
            && !text[s.emitted..upto].ends_with('\u{fffd}')
        {
            let _ = s
                .req
                .events
                .send(Event::Text(text[s.emitted..upto].to_string()));
            s.emitted = upto;
        }
        done
    }

    fn finish(&self, s: Seq, reason: &'static str) {
        markers::request_end(s.req.id);
        let name = self.model.name.clone();
        metrics::counter!("vllm:generation_tokens_total", "model_name" => name.clone())
            .increment(s.generated.len() as u64);
        metrics::histogram!("vllm:e2e_request_latency_seconds", "model_name" => name.clone())
            .record(s.req.submitted.elapsed().as_secs_f64());
        metrics::counter!("vllm:request_success_total", "model_name" => name, "finished_reason" => reason).increment(1);
        let ended_on_eos = !s.req.ignore_eos && s.generated.last() == Some(&self.model.eos);
        let completion_tokens = s.generated.len() - usize::from(ended_on_eos);
        let _ = s.req.events.send(Event::Done(Finish {
            reason,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens,
            queue: s.queue,
            prefill: s.prefill,
        }));
    }
}
